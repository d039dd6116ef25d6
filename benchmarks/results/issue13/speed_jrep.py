import time
from benchmarks import speed
from benchmarks.common import setup_env
setup_env()
t0 = time.perf_counter()
per_step, diff = speed.measure_steps(("grpo", "ibpo", "ibpo_jrep"), "tiny", 3, 4)
print(speed.split_table(per_step, diff).to_string())
print(f"{time.perf_counter()-t0:.0f}s", flush=True)
t0 = time.perf_counter()
print(speed.repair_pass_times().to_string())
print(f"{time.perf_counter()-t0:.0f}s")
