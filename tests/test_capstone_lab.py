"""Lab 11's exercise checks (they pass the right answers and fail wrong or skipped ones), its tour and its bench."""
import pytest

from labkit.capstone import bench, lab, planner
from labkit.runtime import mesh as mesh_mod


def place(rank, dp, pp, tp):
    d, p, t = rank // (pp * tp), (rank // tp) % pp, rank % tp
    at = lambda d, p, t: (d * pp + p) * tp + t  # noqa: E731
    return {"dp": [at(k, p, t) for k in range(dp)], "pp": [at(d, k, t) for k in range(pp)],
            "tp": [at(d, p, k) for k in range(tp)]}


def test_mesh_check_passes_the_answer_and_fails_wrong_ones():
    assert lab.check_mesh_groups(place).passed

    def swapped(rank, dp, pp, tp):  # dp and pp confused
        g = place(rank, dp, pp, tp)
        return {"dp": g["pp"], "pp": g["dp"], "tp": g["tp"]}

    def tp_outermost(rank, dp, pp, tp):  # a different layout: consecutive ranks in the dp group
        return place(rank, tp, pp, dp) | {}

    def borrowed(rank, dp, pp, tp):  # labkit's own arithmetic is refused meanwhile
        return mesh_mod.members_of(rank, dp, pp, tp)

    def skipped(rank, dp, pp, tp):
        raise NotImplementedError

    assert not lab.check_mesh_groups(swapped).passed
    assert not lab.check_mesh_groups(tp_outermost).passed
    res = lab.check_mesh_groups(borrowed)
    assert not res.passed and "mesh arithmetic" in str(res)
    assert not lab.check_mesh_groups(skipped).passed
    assert not lab.check_mesh_groups(lambda *a: None).passed
    assert mesh_mod.members_of(5, 2, 2, 2)["tp"] == [4, 5]  # the refusal ends with the check


def test_tp_bytes_check_measures_on_ranks():
    right = lambda b, s, h, t, e: 4 * (t - 1) / t * b * s * h * e  # noqa: E731
    assert lab.check_tp_mlp_bytes(right).passed
    one = {4: [(1, 16, 64, 8)]}  # at t = 2 the ring factor 2(t-1)/t is 1: only t > 2 tells it apart
    payload_only = lambda b, s, h, t, e: 2 * b * s * h * e  # noqa: E731  (forgets the ring factor)
    assert not lab.check_tp_mlp_bytes(payload_only, cases=one).passed
    forward_only = lambda b, s, h, t, e: 2 * (t - 1) / t * b * s * h * e  # noqa: E731
    assert not lab.check_tp_mlp_bytes(forward_only, cases=one).passed

    def runs_it(b, s, h, t, e):  # measuring instead of predicting is refused
        import labkit
        return labkit.launch(lambda ctx: 0, world_size=t)[0]

    res = lab.check_tp_mlp_bytes(runs_it, cases=one)
    assert not res.passed and "must not run" in str(res)
    assert not lab.check_tp_mlp_bytes(lambda *a: None, cases=one).passed


def test_configuration_check_uses_the_planner_rules():
    model = planner.Model(layers=80, width=8192, heads=64, seq=4096, vocab=32000, global_batch=1024,
                          recompute="selective")
    cluster = planner.Cluster(gpus=256, gpu_memory_gb=80, peak_tflops=989, intra_node_GBps=450, inter_node_GBps=50)
    assert lab.check_configuration(lambda m, c: (8, 4, 8), model, cluster).passed
    res = lab.check_configuration(lambda m, c: (32, 2, 4), model, cluster)
    assert not res.passed and "does not fit" in str(res)
    res = lab.check_configuration(lambda m, c: (4, 4, 16), model, cluster)
    assert not res.passed and "across nodes" in str(res)
    res = lab.check_configuration(lambda m, c: (4, 4, 8), model, cluster)
    assert not res.passed and "use them all" in str(res)
    assert not lab.check_configuration(lambda m, c: None, model, cluster).passed
    assert not lab.check_configuration(lambda m, c: (8, 4), model, cluster).passed

    def asks_the_planner(m, c):
        best = planner.plan(m, c)[0]
        return best.dp, best.pp, best.tp

    res = lab.check_configuration(asks_the_planner, model, cluster)
    assert not res.passed and "you called the planner" in str(res)
    assert planner.plan(model, cluster)  # the refusal ends with the check

    def skipped(m, c):
        raise NotImplementedError

    assert not lab.check_configuration(skipped, model, cluster).passed


@pytest.mark.slow
def test_tour_passes():
    rows = lab.tour()
    assert len(rows) == 6 and all(r["ok"] for r in rows), rows


def test_bench_prints_a_grid_against_one_process(capsys):
    assert bench.main(["--grid", "1x1x2", "--grid", "2x1x1", "--steps", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "one process, one thread" in out and "1×1×2" in out and "2×1×1" in out
    assert " NO " not in out and out.count("yes") == 2  # measured bytes equal the formulas
    with pytest.raises(SystemExit, match="DPxPPxTP"):
        bench.main(["--grid", "2by2"])
