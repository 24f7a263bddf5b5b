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


def test_simulator_plots_draw_one_bar_line_or_collection_per_item():
    import matplotlib

    matplotlib.use("Agg")  # this test process only
    import matplotlib.pyplot as plt

    from labkit.capstone import plots, simulator

    table = [{"params B": 1.7, "GPUs": 32, "published": 137.0, "predicted": 126.0, "error": -0.08, "fit": ""},
             {"params B": 145.6, "GPUs": 1536, "published": 148.0, "predicted": 148.0, "error": 0.0, "fit": "fit"}]
    ax = plots.published_bars(table)
    assert [len(c) for c in ax.containers] == [2, 2]   # published, predicted: one bar a row each
    assert [b.get_height() for b in ax.containers[1]] == [126.0, 148.0] and ax.containers[1][1].get_hatch() == "//"
    assert [t.get_text() for t in ax.texts] == ["-8%", "+0% (fit)"]
    # a 2-stage step: one collection of rectangles per kind, sends only when asked, one tick per stage
    model = simulator.Transformer(layers=4, width=8, heads=2, vocab=16, seq=4, micro_batch=1, global_batch=4)
    hw = simulator.Hardware(peak_flops={"bf16": 1e6}, memory_bytes=1e9, hbm_bytes_per_s=1e5, intra_alpha=1e-3,
                            intra_beta=1e-6, inter_alpha=1e-2, inter_beta=1e-5, gemm_efficiency=0.5,
                            attention_efficiency=0.25, memory_efficiency=0.5, gpus_per_node=1)
    events = simulator.predict(model, hw, simulator.Layout(pp=2), 2).events
    kinds = {e["kind"] for e in events}
    assert "send" in kinds
    ax = plots.step_timeline(events)
    assert sorted(c.get_label() for c in ax.collections) == sorted(kinds - {"send"})
    assert sum(len(c.get_paths()) for c in ax.collections) == sum(e["kind"] != "send" for e in events)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["stage 0", "stage 1"]
    assert len(plots.step_timeline(events, sends=True).get_yticklabels()) == 4
    with pytest.raises(ValueError, match="no events"):
        plots.step_timeline([e for e in events if e["kind"] == "send"])
    # MFU sweeps: one panel and one line a sweep, the points that do not fit hollow
    sweeps = {"tp": {"x": [1, 2, 4], "mfu": [0.4, 0.38, 0.35], "fits": [False, True, True], "xlabel": "tp"},
              "pp": {"x": [2, 4], "mfu": [0.37, 0.36], "fits": [True, True], "xlabel": "pp"}}
    axes = plots.mfu_sweeps(sweeps)
    assert len(axes) == 2 and [len(ax.lines) for ax in axes] == [1, 1]
    assert list(axes[0].lines[0].get_ydata()) == pytest.approx([40, 38, 35])
    assert [len(ax.collections) for ax in axes] == [1, 0]   # the hollow markers
    assert len(axes[0].collections[0].get_offsets()) == 1
    plt.close("all")


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
    assert bench.main(["--part", "grids", "--grid", "1x1x2", "--grid", "2x1x1", "--steps", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "one process, one thread" in out and "1×1×2" in out and "2×1×1" in out
    assert " NO " not in out and out.count("yes") == 2  # measured bytes equal the formulas
    assert "round 1/1 done" in out and "[grids: " in out and "published" not in out and "measured" not in out
    with pytest.raises(SystemExit, match="DPxPPxTP"):  # refused before the published part runs
        bench.main(["--part", "published,grids", "--grid", "2by2"])
    assert "published" not in capsys.readouterr().out


def test_bench_parser_parts_quick_and_bad_input(capsys):
    args = bench.parse([])
    assert args.part == ("published", "measured", "grids") and (args.rounds, args.steps) == (3, 3)
    args = bench.parse(["--quick", "--part", "measured, published"])
    assert args.part == ("measured", "published") and (args.rounds, args.steps) == (1, 2)
    assert (bench.parse(["--quick", "--rounds", "2"]).rounds, bench.parse(["--steps", "5"]).steps) == (2, 5)
    # the grids' own options (gpu_check.sh, the notebook's --all) run the grids alone unless --part says otherwise
    assert bench.parse(["--grid", "2x2x2"]).part == bench.parse(["--all"]).part == ("grids",)
    assert bench.parse(["--grid", "2x2x2", "--grid", "1×1×2"]).grid == [(2, 2, 2), (1, 1, 2)]
    assert bench.parse(["--all", "--part", "published,grids"]).part == ("published", "grids")
    for argv, said in ((["--part", "published,simulator"], "'simulator' is not a part"),
                       (["--part", ","], "no part named"), (["--rounds", "0"], "--rounds 0"),
                       (["--steps", "-1"], "--steps -1")):
        with pytest.raises(SystemExit):
            bench.parse(argv)
        err = capsys.readouterr().err
        assert said in err and ("published, measured, grids" in err or ">= 1" in err), err


def test_bench_prints_the_published_table_first(capsys):
    assert bench.main(["--part", "published"]) == 0
    out = capsys.readouterr().out
    assert out.index("Table 1") < out.index("Table 2") < out.index("Llama 3") < out.index("[published: ")
    assert "145.6" in out and "+0.0%  fit" in out  # the fitted row, marked
    assert "2. measured" not in out and "3. grids" not in out and "running time: published" in out


def test_bench_measured_part_with_fake_measurements(monkeypatch, capsys):
    from labkit.capstone import calibrate as cal
    m = cal.Machine(flops=3e10, flops32=8e10, copy_bytes_per_s=1.5e10, alpha=3e-4, beta=7e-10, cores=2,
                    collective_alpha={2: 3e-4, 4: 1e-3, 8: 2.5e-3})
    true = cal.cpu_hardware(m.flops, m.alpha, m.beta, m.copy_bytes_per_s, layer_overhead=1e-3)
    seen = {}
    monkeypatch.setattr(cal, "measure_machine", lambda repeats, log: seen.setdefault("repeats", repeats) and m)
    monkeypatch.setattr(cal, "_measure_grid", lambda s, steps: seen.setdefault("steps", steps) and (
        cal.predict_grid(true, *s, cores=2) * (3 if s == (1, 2, 1) else 1)))
    monkeypatch.setattr(cal, "_measure_pipeline",
                        lambda c, steps: cal.predict_pipeline(c, m.flops32, m.alpha, m.beta, 2e-4, 2))
    assert bench.main(["--part", "measured,published", "--quick"]) == 0
    out = capsys.readouterr().out
    assert seen == {"repeats": 5, "steps": 2}  # --quick: a shorter ping-pong, 2 steps, 1 round
    assert out.index("[published: ") < out.index("2. measured") < out.index("[measured: ")  # the bench's order
    assert "1 interleaved round(s) of 2 step(s)" in out and "  round 1/1: 13 runs" in out
    first, second = out.split("alpha from lab 01's ping-pong")[1].split("alpha from a small all-reduce")
    assert "10 of 11 configurations within ±25%" in first  # 1×2×1 measured 3x its prediction: the one miss
    assert "configurations within ±25%" in second and "grid 1000 µs, pipeline 200 µs" in out
    assert "running time: published" in out and "measured" in out.split("running time: ")[1]
