"""The router's automatic training threads count only other processes' CPU use."""

import os
import threading
import time

from router_model.train import auto_threads, busy_cores


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def test_this_processs_own_work_is_measured_apart_from_the_machines():
    stop = threading.Event()
    spinner = threading.Thread(target=_spin, args=(stop,), daemon=True)
    spinner.start()
    try:
        time.sleep(0.1)
        total, own = busy_cores(0.5)
    finally:
        stop.set()
        spinner.join()
    assert own >= 0.5, "a spinning thread keeps at least half a core busy"
    assert total >= own - 0.2, "the machine's use includes this process's"


def test_training_takes_every_core_unless_other_processes_keep_them_busy():
    cores = os.cpu_count()
    assert auto_threads(0.1, measure=lambda _: (1.9, 1.8)) == cores, "its own work leaves the cores to it"
    assert auto_threads(0.1, measure=lambda _: (0.3, 0.0)) == cores
    assert auto_threads(0.1, measure=lambda _: (1.9, 0.2)) == 1, "others hold the cores"


def test_training_gives_the_process_its_thread_count_back():
    import torch

    from router_model.train import seeded_training

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with seeded_training(0, 2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
