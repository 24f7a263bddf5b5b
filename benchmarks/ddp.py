"""Steps per second of the from-scratch DDPs and torch's DDP: ``python benchmarks/ddp.py [--quick]``."""
import sys
from labkit.ddp import bench_main
sys.exit(bench_main())
