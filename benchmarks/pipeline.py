"""Pipeline schedules: measured speed-up over the naive schedule beside p m / (m + p - 1)."""
import sys
from labkit.pipeline_bench import bench_main
sys.exit(bench_main(sys.argv[1:]))
