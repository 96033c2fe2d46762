"""The ahead-of-time kernel report: a tool, not part of the kernels.

    python -m fastgpt.kernels.report [--arch 80,90] [--subset NAME] [--triton DIR]... [--no-installed] ...

compiles every case of the compile catalogue for real GPU targets on a machine
without a GPU and checks each result (registers, spills, shared memory, tensor
cores, wgmma width, TMA, dropout cost). Its rooms, one concept each:

- ``case.py``       a compile case (``CompileCase``, ``TensorArg``);
- ``catalogue.py``  every kernel's cases, ``all_cases()``, the named subsets;
- ``compiler.py``   compiling one case for one arch, and reading the cubin (tools, SASS);
- ``sass.py``       the SASS instruction mix and occupancy;
- ``workers.py``    the spawned compiler processes that do the compiling;
- ``build.py``      the report: rows, their checks, dropout twins, ``build_report``;
- ``present.py``    the table, the failures, and the command line (``main``).

Importing this package imports nothing else (no Triton); see kernels/README.md.
"""
