"""The rewrite that moves loop-invariant scalar statements out of Inductor's CPU loops.

Synthetic kernels in the shape Inductor generates them; the compiled kernels' bits are checked
against un-rewritten ones in ``tests/test_fused.py``.
"""

from __future__ import annotations

from optimi._fused.cpp_rewrites import hoist_invariant_scalars

KERNEL = """
#include "cpp_prefix.h"
extern "C"  void  kernel(const double* in_ptr0,
                       const float* in_ptr1,
                       float* out_ptr0,
                       const int64_t ks0)
{
    #pragma omp parallel
    {
        #pragma omp for
        for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(ks0); x0+=static_cast<int64_t>(16L))
        {
            if(C10_LIKELY(x0 < ks0))
            {
                auto tmp0 = in_ptr0[static_cast<int64_t>(0L)];
                auto tmp1 = at::vec::Vectorized<float>::loadu(in_ptr1 + static_cast<int64_t>(x0), 16);
                auto tmp2 = static_cast<double>(1.0);
                auto tmp3 = double(tmp2 - tmp0);
                auto tmp4 = c10::convert<float>(tmp3);
                auto tmp5 = at::vec::Vectorized<float>(tmp4);
                auto tmp6 = tmp1 * tmp5;
                auto tmp7 = in_ptr1[static_cast<int64_t>(3L)];
                auto tmp8 = tmp4 >= static_cast<float>(0.5) ? tmp4 : decltype(tmp4)(-tmp4);
                tmp6.store(out_ptr0 + static_cast<int64_t>(x0));
            }
            if(C10_UNLIKELY(x0 >= ks0))
            {
                auto tmp0 = in_ptr0[static_cast<int64_t>(0L)];
                auto tmp2 = static_cast<double>(1.0);
                auto tmp3 = double(tmp2 - tmp0);
                auto tmp4 = c10::convert<float>(tmp3);
                auto tmp9 = static_cast<float>(x0);
            }
        }
    }
}
"""


def prologue_and_body(source: str) -> tuple[list[str], str]:
    head, _, body = source.partition("    #pragma omp parallel")
    opening = head.index("{", head.index("kernel("))
    return [line.strip() for line in head[opening + 1 :].splitlines() if line.strip()], body


def test_scalar_statements_move_before_the_loop_in_order():
    source, moved = hoist_invariant_scalars(KERNEL)
    prologue, body = prologue_and_body(source)
    assert prologue == [
        "const auto tmp0 = in_ptr0[static_cast<int64_t>(0L)];",
        "const auto tmp2 = static_cast<double>(1.0);",
        "const auto tmp3 = double(tmp2 - tmp0);",
        "const auto tmp4 = c10::convert<float>(tmp3);",
        "const auto tmp8 = tmp4 >= static_cast<float>(0.5) ? tmp4 : decltype(tmp4)(-tmp4);",
    ]
    assert moved == 5
    for name in ("tmp0", "tmp2", "tmp3", "tmp4", "tmp8"):
        assert f"auto {name} =" not in body  # gone from both the vector loop and its tail
    # vector work, loop-indexed values and loads from non-float64 inputs stay in the loop
    for kept in ("auto tmp1 =", "auto tmp5 =", "auto tmp6 =", "auto tmp7 =", "auto tmp9 ="):
        assert kept in body


def test_a_name_defined_differently_in_two_loops_stays():
    vector_loop, tail = KERNEL.rsplit("double(tmp2 - tmp0)", 1)
    source = vector_loop + "double(tmp2 + tmp0)" + tail
    rewritten, moved = hoist_invariant_scalars(source)
    prologue, body = prologue_and_body(rewritten)
    assert moved == 2  # tmp0 and tmp2; tmp3 is ambiguous and tmp4, tmp8 read it
    assert [line.split(" =")[0] for line in prologue] == ["const auto tmp0", "const auto tmp2"]
    assert body.count("auto tmp3 =") == 2 and body.count("auto tmp4 =") == 2


def test_unrecognised_kernels_are_left_alone():
    no_float64_input = KERNEL.replace("const double* in_ptr0", "const float* in_ptr0")
    assert hoist_invariant_scalars(no_float64_input) == (no_float64_input, 0)
    not_a_kernel = KERNEL.replace('extern "C"  void  kernel(', 'extern "C"  int  other(')
    assert hoist_invariant_scalars(not_a_kernel) == (not_a_kernel, 0)
    calls_a_function = KERNEL.replace("c10::convert<float>(tmp3)", "some_function(tmp3)")
    _, moved = hoist_invariant_scalars(calls_a_function)
    assert moved == 3  # tmp0, tmp2, tmp3; tmp4 calls an unknown function, tmp8 reads tmp4
