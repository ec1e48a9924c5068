"""Loop-invariant scalars moved out of Inductor's CPU loops (used by the fused backend).

[Note: hoisting the hyperparameters]
The fused step passes its hyperparameters packed in one float64 tensor ([Note: the fused
backend]), so the kernel Inductor generates reads them through a ``const double*`` argument and
derives what the update needs from them (``1 - beta1``, ``-lr / bias_correction1``, lerp's
branch on its weight, each value converted to float32 and broadcast to a vector) inside the loop
body, once per 16 elements. GCC cannot move that work out of the loop: the vector stores go
through ``__m512i``/``__m256i`` pointers, which may alias anything, so every iteration reloads the
scalars and redoes a float64 division, conversions and broadcasts, and the broadcast vectors
cannot stay in registers. On a 2-core AVX-512 machine the bf16+Kahan AdamW kernel runs
1.26-1.29x faster without that work (measured, docs/benchmarks.md).

:func:`hoist_invariant_scalars` rewrites the generated source before it is compiled: each
statement ``auto tmpN = <expression>;`` whose expression uses only constant-index loads from a
``const double*`` input, literals, casts, arithmetic and other such statements is evaluated once,
at the top of the kernel, and removed from the loops. The statements are unchanged and run in
the same order, on the same values (the kernel never writes its ``const`` inputs), so the
kernel's results are bit-identical; GCC then keeps the broadcast vectors in registers. A
statement is moved only where every definition of its name in the kernel is the same text, so
nothing is moved whose meaning depends on the loop it sits in. Source the rules do not
recognise is left as it is: the kernel is then as fast as before, never wrong.
"""

from __future__ import annotations

import re

__all__ = ["hoist_invariant_scalars", "vector_bitcasts"]

_SIGNATURE = re.compile(r'extern "C"\s+void\s+kernel\((?P<arguments>[^)]*)\)\s*\{')
_DEFINITION = re.compile(r"^[ \t]*auto (?P<name>tmp\d+) = (?P<value>[^;\n]+);[ \t]*\n", re.M)
_POINTER_ARGUMENT = re.compile(r"const\s+double\s*\*\s*(?P<name>\w+)")
# everything a hoistable expression may contain; anything else (the loop index, a vector type,
# a lambda, a function not listed) keeps the statement in the loop
_TOKEN = re.compile(
    r"""
    \s+
    | (?P<load>(?P<pointer>\w+)\[static_cast<int64_t>\(\d+L?\)\])
    | (?P<temporary>tmp\d+)
    | \d+(?:\.\d*)?(?:[eE][+-]?\d+)?[fL]?
    | static_cast<(?:float|double|bool|int32_t|int64_t)>
    | c10::convert<(?:float|double)>
    | decltype | double | float | std::abs
    | >= | <= | == | != | [-+*/<>?:()!]
    """,
    re.X,
)


def _references(value: str, pointers: set[str]) -> set[str] | None:
    """The temporaries ``value`` reads, or ``None`` if it is not a hoistable scalar expression."""
    temporaries = set()
    position = 0
    while position < len(value):
        token = _TOKEN.match(value, position)
        if token is None:
            return None
        if token.group("load") and token.group("pointer") not in pointers:
            return None
        if token.group("temporary"):
            temporaries.add(token.group("temporary"))
        position = token.end()
    return temporaries


def hoist_invariant_scalars(source: str) -> tuple[str, int]:
    """``source`` with its loop-invariant scalar statements evaluated once, and how many moved.

    See [Note: hoisting the hyperparameters]. Returns ``source`` unchanged (and 0) where nothing
    qualifies or the kernel's signature is not recognised.
    """
    signature = _SIGNATURE.search(source)
    if signature is None:
        return source, 0
    pointers = {match.group("name") for match in _POINTER_ARGUMENT.finditer(signature.group("arguments"))}
    if not pointers:
        return source, 0
    body_start = signature.end()

    values: dict[str, str] = {}
    order: list[str] = []
    ambiguous: set[str] = set()
    for definition in _DEFINITION.finditer(source, body_start):
        name, value = definition.group("name"), " ".join(definition.group("value").split())
        if name not in values:
            values[name] = value
            order.append(name)
        elif values[name] != value:
            ambiguous.add(name)

    hoisted: set[str] = set()
    changed = True
    while changed:  # a statement moves once everything it reads has moved
        changed = False
        for name in order:
            if name in hoisted or name in ambiguous:
                continue
            references = _references(values[name], pointers)
            if references is not None and references <= hoisted:
                hoisted.add(name)
                changed = True
    if not hoisted:
        return source, 0

    def keep_unless_hoisted(definition: re.Match[str]) -> str:
        return "" if definition.group("name") in hoisted else definition.group(0)

    body = _DEFINITION.sub(keep_unless_hoisted, source[body_start:])
    # in order of first appearance, which is an order where each statement follows what it reads
    prologue = "".join(f"\n    const auto {name} = {values[name]};" for name in order if name in hoisted)
    return source[:body_start] + prologue + body, len(hoisted)


# [Note: bitcasts without the stack]
# Inductor writes a vector bitcast (``tensor.view(torch.float32)`` of int32 words, which the packed
# bf16 kernel does for every element, [Note: packed bf16 columns] in ``packing.py``) as a lambda
# that stores the vector to a stack array, converts it element by element in a scalar loop, and
# loads the result from a second array. Whether that costs anything depends on the compiler and
# the CPU: GCC folds the loop where it vectorizes it, but torch 2.15 builds with
# ``-fno-tree-loop-vectorize``, and with AVX-512 on an Intel Sapphire Rapids GCC splits the loop
# into 256-bit halves whose reload cannot be forwarded from the 512-bit store (the packed AdamW
# step ran 5.8x slower than the plain kernel there). A bitcast needs no loop: the vector's bytes,
# stored once, already are the result, so the rewrite loads the destination type straight from
# the first array (``loadu`` takes untyped memory). Same bits, by construction.
_BITCAST = re.compile(
    r"""\[&\]\(\)\s*\{\s*
    __at_align__\ std::array<(?P<source_type>int32_t|float),\ (?P<lanes>\d+)>\ (?P<buffer>tmpbuf\w*);\s*
    (?P<vector>tmp\d+)\.store\((?P=buffer)\.data\(\),\ static_cast<int64_t>\((?P=lanes)\)\);\s*
    __at_align__\ std::array<(?P<target_type>int32_t|float),\ (?P=lanes)>\ tmpbuf_out;\s*
    for\ \(int\ i\ =\ 0;\ i\ <\ static_cast<int64_t>\((?P=lanes)\);\ i\+\+\)\s*
    \{\s*tmpbuf_out\[i\]\ =\ c10::bit_cast<(?P=target_type)>\((?P=buffer)\[i\]\);\s*\}\s*
    return\ at::vec::Vectorized<(?P=target_type)>::loadu\(
        tmpbuf_out\.data\(\),\ static_cast<int64_t>\((?P=lanes)\)\);\s*
    \}\s*\(\)""",
    re.X,
)


def vector_bitcasts(source: str) -> tuple[str, int]:
    """``source`` with each 32-bit vector bitcast done through one store and one load, and how many.

    See [Note: bitcasts without the stack]. Only int32/float32 bitcasts of the exact shape Inductor
    writes are rewritten; anything else is left as generated.
    """

    def direct(match: re.Match[str]) -> str:
        lanes, buffer = match.group("lanes"), match.group("buffer")
        return (
            f"[&]() {{ __at_align__ std::array<{match.group('source_type')}, {lanes}> {buffer}; "
            f"{match.group('vector')}.store({buffer}.data(), static_cast<int64_t>({lanes})); "
            f"return at::vec::Vectorized<{match.group('target_type')}>::loadu({buffer}.data(), "
            f"static_cast<int64_t>({lanes})); }}()"
        )

    return _BITCAST.subn(direct, source)
