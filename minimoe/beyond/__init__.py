"""Chapter 3 — beyond the GP: other ways to route and to balance.

    hash_router.py     hash routing: a GP who never reads the symptoms (Hash Layers), a baseline
    expert_choice.py   expert-choice routing: the specialists pick their patients
    lossfree.py        auxiliary-loss-free balancing: a bias that steers the referrals, not the advice
                       (DeepSeek-V3's sigmoid gate by default)
    shared_experts.py  shared + fine-grained experts (DeepSeekMoE's routing): a specialist on duty
                       for everyone
    ranks.py           ranks that never wait forever: a status meeting before every collective, and
                       P simulated ranks in one process that report a would-be hang by name
    parallel.py        expert parallelism over MPI: a network of clinics, the all-to-all by hand —
                       the layer's one pair, run with a team whose experts live on other ranks
"""
