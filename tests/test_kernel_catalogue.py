"""The compile catalogue and its named subset, without compiling anything.

CI compiles the whole catalogue with the GPU machines' Triton and only the
``representative`` subset with the installed one; the subset must keep every
kind of check the report makes alive (tensor cores, wgmma width, TMA, dropout
cost against a twin that is there too).
"""

import pytest

pytest.importorskip("triton")

from fastgpt.kernels.report import catalogue, present  # noqa: E402

EXPECTATIONS = ("expects_tensor_cores", "expects_min_wgmma_n", "expects_tma", "expects_max_dropout_cost")


@pytest.fixture(scope="module")
def cases():
    return catalogue.all_cases()


@pytest.fixture(scope="module")
def subset(cases):
    return catalogue.representative_cases(cases)


def _dtypes_by_kernel(cases):
    found = {}
    for case in cases:
        found.setdefault(case.kernel, set()).update(case.pointer_types.values())
    return found


def test_the_subset_is_a_small_filter_of_the_catalogue(cases, subset):
    ids = {id(case) for case in cases}
    assert all(id(case) in ids for case in subset)
    assert [case for case in cases if any(case is chosen for chosen in subset)] == subset  # catalogue order
    assert 0.05 * len(cases) <= len(subset) <= 0.2 * len(cases), (len(subset), len(cases))
    assert catalogue.SUBSETS["representative"](cases) == subset


def test_the_subset_has_every_kernel_and_its_dtypes(cases, subset):
    assert {case.kernel for case in subset} == {case.kernel for case in cases}
    assert _dtypes_by_kernel(subset) == _dtypes_by_kernel(cases)


def test_the_subset_keeps_every_kind_of_expectation_live(cases, subset):
    for name in EXPECTATIONS:
        assert any(getattr(case, name) for case in cases), name
        assert any(getattr(case, name) for case in subset), name
    # TMA is compiled for sm_90 only; the wgmma width holds for the pinned and the tuned tiles alike.
    assert all(case.archs == (90,) for case in subset if case.expects_tma)
    wide = {case.config for case in subset if case.expects_min_wgmma_n and case.kernel.startswith("attention_fwd")}
    assert any("BLOCK_M=64 BLOCK_N=64 warps=4 stages=2" in config for config in wide)  # sm_90's pinned tile
    assert any("BLOCK_M=128 BLOCK_N=128" in config for config in wide)  # sm_90's first tuned tile


def test_every_dropout_case_in_the_subset_has_its_twin_there(subset):
    keys = {catalogue.dropout_twin_key(case) for case in subset if "+dropout" not in case.kernel}
    dropout = [case for case in subset if "+dropout" in case.kernel]
    assert dropout and all(case.expects_max_dropout_cost for case in dropout)
    missing = [(case.kernel, case.config) for case in dropout if catalogue.dropout_twin_key(case) not in keys]
    assert not missing


def test_a_dropout_case_brings_its_twin_even_when_the_rule_leaves_it_out(cases):
    # sm_90's first dropout backward tile (64 × 128, 1 stage) is third in the p = 0 list.
    twin_added = [case for case in catalogue.representative_cases(cases)
                  if not case.representative and "+dropout" not in case.kernel]
    assert twin_added and all(case.kernel.startswith("attention_") for case in twin_added)


def test_the_cli_selects_a_subset_and_refuses_no_triton_at_all(capsys):
    assert present.main(["--subset", "representative", "--arch", "90"], cases=[]) == 0
    assert "no kernels in the catalogue" in capsys.readouterr().out
    assert present.main(["--no-installed"], cases=[]) == 2
    assert "--no-installed needs a --triton DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        present.main(["--subset", "nonesuch"], cases=[])


def test_attention_cases_carry_how_an_sm86_or_sm89_launcher_prunes_them(cases):
    """The report holds sm_86/sm_89 (99 KB) from the sm_80 compile; it needs, per attention tile of the
    sm80 family's tuned lists, the launcher's estimate and its list (attention_configs.candidates)."""
    from fastgpt.kernels.attention_configs import pinned
    groups = {}
    for case in cases:
        if case.pruning is None:
            continue
        assert case.kernel.startswith(("attention_fwd", "attention_bwd")) and not case.expects_tma
        assert case.archs is None or 80 in case.archs  # compiled for sm_80, so held for sm_86/sm_89
        assert case.pruning.estimate > 0
        groups.setdefault((case.pruning.group, case.shape), []).append(case)
    assert groups
    for (group, shape), members in groups.items():
        assert len({case.config for case in members}) == members[0].pruning.size, group  # the whole list
        assert sum(case.pruning.last for case in members) == 1, group
    d64 = [case for case in cases if case.pruning and case.pruning.pinned]
    assert d64 and all(repr(pinned(case.kernel.split("_")[1].split("+")[0], int(case.config.split("d=")[1].split()[0]),
                                   case.config.startswith("fp32"))) in case.config for case in d64)
