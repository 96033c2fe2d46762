"""Check that every Triton launch a block of code makes is a case of the compile catalogue.

The catalogue (``fastgpt.kernels.report.catalogue.all_cases()``) is what
``python -m fastgpt.kernels.report`` compiles ahead of time for sm_80 and sm_90;
a launch outside it (a dtype mix, a block size, a warp count nobody compiled)
is a specialisation that was never checked for spills or even for compiling.
"""

from collections import defaultdict
from contextlib import contextmanager

import torch

_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                  torch.int64: "*i64", torch.int32: "*i32"}


def _launch(fn, args, kwargs) -> dict:
    bound = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k in fn.arg_names}
    return {"kernel": fn.__name__, "bound": bound,
            "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}


def _matches(case, launch) -> bool:
    from fastgpt.kernels.report.case import INTEGER_SPECIALISATIONS
    bound = launch["bound"]
    return (case.num_warps == launch["num_warps"] and case.num_stages == launch["num_stages"]
            and all(bound.get(name) == value for name, value in case.constexprs.items()
                    if name not in INTEGER_SPECIALISATIONS)
            and all(case.pointer_types.get(name) == _POINTER_TYPES.get(value.dtype)
                    for name, value in bound.items() if isinstance(value, torch.Tensor)))


def _describe(launch) -> str:
    parts = [f"{name}={_POINTER_TYPES.get(v.dtype, v.dtype) if isinstance(v, torch.Tensor) else v}"
             for name, v in launch["bound"].items() if isinstance(v, torch.Tensor) or name.isupper()]
    return f"{launch['kernel']}({', '.join(parts)}, num_warps={launch['num_warps']})"


@contextmanager
def launches_in_the_catalogue():
    """Record the block's kernel launches; on leaving, fail on any the catalogue lacks.

    Yields the list of launches, so a test can also check that some happened.
    """
    from fastgpt.kernels.report.catalogue import all_cases

    cases_by_fn = defaultdict(list)
    for case in all_cases():
        cases_by_fn[case.fn].append(case)
    launches = []
    for fn in cases_by_fn:
        original = fn.run

        def recording_run(*args, _fn=fn, _original=original, **kwargs):
            launches.append((_fn, _launch(_fn, args, kwargs)))
            return _original(*args, **kwargs)

        fn.run = recording_run  # fn[grid](...) calls self.run: the instance attribute wins
    try:
        yield launches
    finally:
        for fn in cases_by_fn:
            del fn.run
    missing = [_describe(launch) for fn, launch in launches
               if not any(_matches(case, launch) for case in cases_by_fn[fn])]
    assert not missing, f"launched but not in the compile catalogue: {sorted(set(missing))}"
