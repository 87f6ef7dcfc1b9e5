"""Chapter 3 — beyond the GP: other ways to route and to balance.

    hash_router.py     hash routing: a GP who never reads the symptoms (Hash Layers), a baseline
    expert_choice.py   expert-choice routing: the specialists pick their patients
    lossfree.py        auxiliary-loss-free balancing: a bias that steers the referrals, not the advice
                       (DeepSeek-V3's sigmoid gate by default)
    shared_experts.py  shared + fine-grained experts (DeepSeekMoE's routing): a specialist on duty
                       for everyone
    parallel.py        expert parallelism over MPI: a network of clinics, the all-to-all by hand
"""
