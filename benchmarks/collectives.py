"""Bus bandwidth of hand-written all-reduce algorithms next to torch.distributed's own: ``python benchmarks/collectives.py --quick``."""
import sys

from labkit.collectives_bench import bench_main

if __name__ == "__main__":
    raise SystemExit(bench_main(sys.argv[1:]))
