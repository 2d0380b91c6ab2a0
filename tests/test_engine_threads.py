"""The torch threads of an in-process vLLM engine on a CPU (functions/backends/cpu_threads.py): vLLM's own
server's rule, every physical core but those reserved for the serving around it."""

from __future__ import annotations

import os

from functions.backends.cpu_threads import engine_threads, physical_cores


def test_every_physical_core_but_one_by_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    assert engine_threads() == max(1, physical_cores(os.sched_getaffinity(0)) - 1)


def test_vllms_own_reserve_setting_is_followed_and_one_thread_is_the_least(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = physical_cores(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    assert engine_threads() == cores
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", str(cores + 5))
    assert engine_threads() == 1


def test_an_operators_omp_num_threads_stands(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert engine_threads() is None


def test_smt_siblings_count_as_one_core(tmp_path, monkeypatch):
    """Two logical CPUs of one core (SMT) are one physical core, as vLLM binds one thread per core."""

    def topology(cpu: int, core: int):
        folder = tmp_path / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text("0\n")
        (folder / "core_id").write_text(f"{core}\n")

    for cpu, core in [(0, 0), (1, 0), (2, 1), (3, 1)]:
        topology(cpu, core)
    from functions.backends import cpu_threads

    monkeypatch.setattr(cpu_threads, "SYS_CPU", tmp_path)
    assert physical_cores({0, 1, 2, 3}) == 2
    assert physical_cores({0, 1, 2, 3, 9}) == 3  # no topology to read: its own core
