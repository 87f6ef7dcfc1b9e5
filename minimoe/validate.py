"""Argument checks shared by every public function.

A bad argument should fail loudly, at the door, with a message that names the
argument and says what was expected — never deep inside a matmul, and never by
quietly producing NaN or the wrong shape. Every public forward function in
minimoe calls these helpers on its inputs; the tests check the messages.
"""
from __future__ import annotations

import contextlib
import numbers

import numpy as np

__all__ = ["check_tokens", "check_array", "check_shapes", "all_finite", "check_int", "check_positive_float", "check_choice", "check_rng", "check_dtype"]


def _fmt_shape(shape):
    """``(3, None)`` -> ``"(3, ?)"``; a one-element shape keeps its comma, ``"(3,)"``."""
    parts = ["?" if s is None else str(s) for s in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def check_array(name, x, *, ndim=None, shape=None, finite=True, floating=True):
    """Check that ``x`` is a NumPy array of the expected rank, shape and kind.

    Args:
        name: the argument's name, used in the error message.
        x: the value to check.
        ndim: required number of dimensions (an int or a tuple of allowed ints).
        shape: required shape; ``None`` entries are wildcards, e.g. ``(None, d)``
            (shown as ``(?, d)`` in the message).
        finite: if True, reject NaN and inf (they would silently poison every
            result downstream).
        floating: if True, require a floating-point dtype.

    Returns:
        ``x`` unchanged, so the call can be used inline.

    Raises:
        TypeError: ``x`` is not an ndarray, is a masked array or an ``np.matrix``
            (their mask and semantics would be silently lost), or has the wrong dtype kind.
        ValueError: wrong rank, wrong shape, or non-finite values.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    # Subclasses that change what the numbers mean are refused, not silently reinterpreted:
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array: minimoe would silently use the values under its mask; "
                        f"fill them (x.filled(value)) or drop the masked rows, then pass a plain ndarray")
    if isinstance(x, np.matrix):
        raise TypeError(f"{name} is a numpy.matrix (always 2-D, * means matmul); pass np.asarray({name})")
    if floating and not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must have a floating dtype (float32 or float64), got {x.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            if len(allowed) <= 3:
                want = " or ".join(str(a) for a in allowed)
            else:
                want = f"{min(allowed)} to {max(allowed)}"
            raise ValueError(f"{name} must have {want} dimensions, got shape {x.shape}")
    if shape is not None:
        ok = len(shape) == x.ndim and all(s is None or s == t for s, t in zip(shape, x.shape))
        if not ok:
            raise ValueError(f"{name} must have shape {_fmt_shape(shape)}, got {x.shape}")
    if finite and x.size and not all_finite(x):
        raise ValueError(f"{name} contains NaN or inf; check the input data or lower the learning rate")
    return x


def check_shapes(*, finite=True, integer=(), **arrays):
    """Check several arrays against shape specs with named sizes, in one line.

        check_shapes(W1=(W1, ("E", "d", "h")), x=(x, ("N", "d")), b1=(b1, ("E", "h")))

    Each keyword is an argument's name and ``(array, spec)`` or ``(array, spec, why)``.
    A spec is a tuple of sizes: a symbol (a str such as ``"d"``), an int, or ``"..."``
    first for any leading dimensions. The first array to show a symbol binds it; every
    later one must agree, so the message names the argument and the size it broke:

        W1 must have 3 dimensions, got shape (4, 5)        (nothing bound yet: the rank)
        x must have shape (?, 4), got (5, 3)               (d = 4 was bound by W1; N is free)
        x has width 3 but W1 expects d=4 (W1 has shape (4, 8))    (the last axis after "...")
        labels must have shape (3,) (one per row of logits), got (2,)   (``why`` in brackets)

    Args:
        finite: reject NaN and inf: True (every floating array), False, or a tuple of names.
        integer: names of arrays that must hold integers (all others must be floating).
        **arrays: ``name=(array, spec[, why])``.

    Returns:
        dict of the bound sizes, ``{"d": 4, ...}`` (``"..."``: the leading shape).
    """
    sizes, binder = {}, {}
    for name, (a, spec, *why) in arrays.items():
        is_int = name in integer
        check_array(name, a, finite=not is_int and (finite if isinstance(finite, bool) else name in finite),
                    floating=not is_int)
        if is_int and not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{name} must be integers, got dtype {a.dtype}")
        lead = bool(spec) and spec[0] == "..."
        tail = spec[1:] if lead else spec
        want = [sizes.get(s) if isinstance(s, str) else s for s in tail]
        if lead and "..." in sizes:
            want = list(sizes["..."]) + want
        elif lead or all(w is None for w in want):
            check_array(name, a, ndim=range(len(tail), 8) if lead else len(tail), finite=False, floating=False)
        got = a.shape[a.ndim - len(want):] if lead and "..." not in sizes else a.shape
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            if lead and "..." not in sizes and len(tail) == 1 and isinstance(tail[0], str):
                s, first = tail[0], binder[tail[0]]
                raise ValueError(f"{name} has width {a.shape[-1]} but {first} expects {s}={sizes[s]} "
                                 f"({first} has shape {arrays[first][0].shape})")
            hint = f" ({why[0]})" if why else ""
            raise ValueError(f"{name} must have shape {_fmt_shape(want)}{hint}, got {a.shape}")
        for s, n in zip(tail, a.shape[a.ndim - len(tail):]):
            if isinstance(s, str) and s not in sizes:
                sizes[s], binder[s] = n, name
        if lead and "..." not in sizes:
            sizes["..."] = a.shape[:a.ndim - len(tail)]
    return sizes


def all_finite(x):
    """True when no entry of ``x`` is NaN or ±inf.

    Speed: this runs on every checked array on every forward, so it first takes one
    sum — a pass with no temporary array, and any NaN or inf entry makes the sum
    non-finite — and only if the sum is not finite (a bad entry, or an overflow of huge
    but finite values) looks entry by entry.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(x)):
            return True
    return bool(np.all(np.isfinite(x)))


def check_int(name, value, *, low=None, high=None):
    """Check that ``value`` is an integer in ``[low, high]`` (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return int(value)


def check_positive_float(name, value, *, allow_zero=False):
    """Check that ``value`` is a finite real number > 0 (or >= 0 if ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


def check_choice(name, value, choices):
    """Check that ``value`` is one of ``choices``."""
    try:
        ok = value in choices
    except (TypeError, ValueError):   # e.g. an array, whose == is elementwise
        ok = False
    if not ok:
        opts = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {opts}; got {value!r}")
    return value


def check_rng(name, rng):
    """Turn ``rng`` into a ``numpy.random.Generator``; minimoe never uses global random state.

    This follows the Scientific Python community's SPEC 7, "Seeding pseudo-random number
    generation" (https://scientific-python.org/specs/spec-0007/): a function that uses
    randomness takes an ``rng`` argument and passes it through ``np.random.default_rng``.

    Accepts what ``np.random.default_rng`` accepts as an explicit seed: an int seed
    (``rng=0`` gives the same numbers as ``rng=np.random.default_rng(0)``), a sequence
    of ints, a ``SeedSequence``, a ``BitGenerator`` or a ``Generator`` (returned as it
    is, so its state is shared with the caller). ``None`` is refused here: a hidden
    fresh seed would make a run unrepeatable, so callers that allow ``None`` choose
    their documented default before calling. The legacy ``RandomState`` and ``bool``
    are refused too (``True`` would silently mean seed 1).
    """
    what = (f"{name} must be a numpy.random.Generator, an int seed or a SeedSequence "
            f"(anything np.random.default_rng accepts, e.g. 0 or np.random.default_rng(0))")
    if rng is None or isinstance(rng, (bool, np.bool_, np.random.RandomState)):
        raise TypeError(f"{what}, got {type(rng).__name__}")
    if isinstance(rng, np.random.Generator):
        return rng
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what}, got {type(rng).__name__} {rng!r:.60} ({err})") from None


def check_dtype(name, dtype):
    """Check that ``dtype`` names a floating-point dtype; return it as a ``numpy.dtype``.

    minimoe computes in float64 (gradient checks, lessons) or float32 (speed);
    an integer dtype would silently truncate every weight to 0, ±1, ±2, ...
    """
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be a numpy dtype such as np.float64 or np.float32, got {dtype!r}") from None
    if not np.issubdtype(dt, np.floating):
        raise TypeError(f"{name} must be a floating dtype (float32 or float64), got {dt}")
    return dt


def check_tokens(x, d_model, dtype):
    """The input check every MoE layer's forward starts with.

    Accepts tokens ``x`` of shape (T, d) or (B, S, d) with ``d == d_model`` and at least
    one token, and flattens them: all B·S tokens are routed together.

    Returns:
        ``(x2, shape)``: x as a (T, d) array of ``dtype`` (no copy when it already is
        one), and x's original shape, to give the output the same shape.
    """
    check_array("x", x, ndim=(2, 3))
    if x.shape[-1] != d_model:
        raise ValueError(f"x must have width d_model={d_model} in its last axis, got shape {x.shape}")
    x2 = x.reshape(-1, d_model).astype(dtype, copy=False)
    if x2.shape[0] == 0:
        raise ValueError(f"x must contain at least one token, got shape {x.shape}")
    return x2, x.shape


# --------------------------------------------------------------------------- output files
__all__ += ["check_out_dir", "atomic_open", "atomic_write_text"]


def check_out_dir(name, path, *, create=True):
    """Check, *before* any long computation, that ``path`` is a directory we can write into.

    Args:
        name: how the caller names the argument in messages (e.g. ``"--out"``).
        path: a directory path (str or os.PathLike). It may not exist yet: then every
            existing part of it must be a directory, and (if ``create``) it is created now.
        create: create a missing directory (else a missing one is an error).

    Returns:
        ``path`` as a str.

    Raises:
        TypeError: ``path`` is not a str or path.
        ValueError: ``path`` is empty, names a file (or lies under one, ``file/sub``), does
            not exist (with ``create=False``), cannot be created, or is not writable.
    """
    import os
    import tempfile

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if not path.strip():
        raise ValueError(f"{name} is empty: give a directory, e.g. {name} results")
    # The nearest part of the path that exists must be a directory: "file/sub" cannot be made.
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        where = "exists and is not a directory" if probe == os.path.abspath(path) else f"is inside {probe!r}, a file"
        raise ValueError(f"{name} {path!r} {where}")
    if not os.path.isdir(path):
        if not create:
            raise ValueError(f"{name} {path!r} does not exist")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            raise ValueError(f"{name} {path!r} cannot be created: {err.strerror or err}") from None
    try:                                   # os.access is not enough (root, read-only mounts): try it
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{name} {path!r} is not writable: {err.strerror or err}") from None
    return path


class _AtomicFile:
    """Context manager behind :func:`atomic_open`."""

    def __init__(self, path, mode):
        import os
        if mode not in ("w", "wb"):
            raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
        self.path, self.mode = os.fspath(path), mode

    def __enter__(self):
        import os
        import tempfile
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(self.path) + ".", suffix=".tmp")
        self.file = os.fdopen(fd, self.mode)
        return self.file

    def __exit__(self, exc_type, exc, tb):
        import os
        try:
            self.file.close()
            if exc_type is None:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self.tmp, 0o666 & ~umask)   # mkstemp makes 0600; a plain open() would not
                os.replace(self.tmp, self.path)        # atomic: readers see the old file or the new one
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)                    # interrupted (even by Ctrl-C): no truncated output
        return False


def atomic_open(path, mode="w"):
    """Open ``path`` for writing *atomically*: ``with atomic_open(p, "wb") as f: ...``.

    The data goes to a temporary file in the same directory, renamed over ``path`` only when
    the block finishes without an exception. An interrupted write (an error, Ctrl-C, a full
    disk) leaves ``path`` as it was — the old file or none — never a truncated one.
    """
    return _AtomicFile(path, mode)


def atomic_write_text(path, text):
    """Write the string ``text`` to ``path`` atomically (see :func:`atomic_open`); returns ``path``."""
    with atomic_open(path, "w") as f:
        f.write(text)
    return path


# --------------------------------------------------------------------------- command lines
__all__ += ["check_out_file", "check_out_files", "arg_int", "exit_cleanly"]


def check_out_file(name, path):
    """Check, *before* any long computation, that a file can be written at ``path``.

    Its folder must exist and be writable (it is not created: a mistyped folder is an
    error, not a new folder), and ``path`` itself must not be a directory. Nothing is
    created or changed.

    Args:
        name: how the caller names the argument in messages (e.g. ``"--json"``).
        path: a file path (str or os.PathLike); a bare name means the current folder.

    Returns:
        ``path`` as a str.

    Raises:
        TypeError: ``path`` is not a str or path.
        ValueError: ``path`` is empty, ends with a slash, is a directory, or its folder
            does not exist, is a file or is not writable.
    """
    import os

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if not path.strip():
        raise ValueError(f"{name} is empty: give a file name, e.g. {name} result.json")
    if path.endswith(tuple(s for s in (os.sep, os.altsep) if s)):
        # "newdir/" names a folder, not a file: writing it would fail only at the very end.
        raise ValueError(f"{name} {path!r} ends with a slash: give a file name, e.g. {path}result.json")
    if os.path.isdir(path):
        raise ValueError(f"{name} {path!r} is a directory; give a file name")
    folder = os.path.dirname(path) or os.curdir
    check_out_dir(f"{name}: folder", folder, create=False)
    return path


def check_out_files(name, folder, filenames):
    """Check that none of ``filenames`` inside ``folder`` is a directory (or a link to one).

    A run that writes several files into a folder calls this (after :func:`check_out_dir`)
    before its long computation: a directory where one of its files goes would otherwise
    stop it at the very end, after some of the files were already replaced.

    Returns:
        ``folder`` as a str.

    Raises:
        ValueError: naming the folder and the first file that is a directory.
    """
    import os

    folder = os.fspath(folder)
    for fname in filenames:
        if os.path.isdir(os.path.join(folder, fname)):
            raise ValueError(f"{name} {folder!r}: {fname} there is a directory; move it aside or choose "
                             f"another {name}")
    return folder


def arg_int(low=None, high=None, why=""):
    """An ``argparse`` ``type=`` for a whole number in ``[low, high]`` (either bound optional).

    Bad text fails inside argparse, so the message names the option and the text given:
    ``argument --repeats: expected a whole number >= 1, got '0'``. ``why``, if given, is
    added in brackets.
    """
    import argparse

    if low is not None and high is not None:
        want = f" from {low} to {high}"
    else:
        want = f" >= {low}" if low is not None else (f" <= {high}" if high is not None else "")
    note = f" ({why})" if why else ""

    def whole_number(text):
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = None
        if value is None or (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected a whole number{want}, got {text!r}{note}")
        return value
    return whole_number


@contextlib.contextmanager
def exit_cleanly():
    """``with exit_cleanly(): ...`` around a command line's work: Ctrl-C and a closed pipe end it
    as a shell tool ends, without a traceback.

    * ``KeyboardInterrupt`` (Ctrl-C) prints one line, ``interrupted``, on stderr and exits
      with status 130 (128 + SIGINT). What the command was writing is left as it was, since
      minimoe writes its outputs atomically (:func:`atomic_open`, or a staging folder).
    * ``BrokenPipeError`` (``python -m minimoe.checks | head -1``: the reader went away)
      exits with status 141 (128 + SIGPIPE), silently.

    Every other exception passes through. stdout is flushed inside the block, so a closed
    pipe is noticed here and not at interpreter exit.
    """
    import os
    import sys

    try:
        yield
        sys.stdout.flush()
    except KeyboardInterrupt:
        if sys.stderr.isatty():
            sys.stderr.write("\r\x1b[K")     # a progress bar may hold the line: clear it first
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except BrokenPipeError:
        # Point stdout at /dev/null, so that Python's last flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):      # stdout is not a real file (a test's capture)
            pass
        finally:
            os.close(devnull)
        raise SystemExit(141) from None
