"""Cold launch vs pooled launch latency (see labkit/launch_bench.py). Usage: python benchmarks/launch.py [--quick]"""
import sys

from labkit.launch_bench import bench_main

sys.exit(bench_main(sys.argv[1:]))
