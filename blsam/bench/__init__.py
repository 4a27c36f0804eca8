"""The side-by-side speed benchmark behind ``blsam-benchmark`` (``blsam.tools.benchmark`` is
its command line): config, models, machine probes, GEMM rates, worker jobs, the interleaved
schedule, results and reports, one module each."""
