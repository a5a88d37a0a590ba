"""Shared pytest configuration: fixtures live in tests/fixtures/ and devcluster/ and are loaded as plugins."""

from __future__ import annotations

import pytest

pytest_plugins: list[str] = [
    "tests.fixtures.cluster",
    "tests.fixtures.s3",
    "tests.fixtures.tiny",
    "tests.fixtures.smollm2",
    "tests.fixtures.openai_server",
    "tests.fixtures.hub_server",
]

LEVELS = ("unit", "ml", "cluster")


# Tests left out of `make test-quick` (still in `make test`): over ~8 s each on 2 cores (measured
# 2026-12-03 with `pytest --durations=0`; a file name alone marks the whole file, a fixture's cost counts).
SLOW = (
    "tests/test_train_parallel.py::test_two_processes",  # two torchrun processes against one: 314 s
    "tests/test_train_parallel.py::test_fsdp",  # 111 s
    "tests/test_train_fsdp.py::test_fsdp_qlora",  # two torchrun processes, 4-bit bf16 on the CPU: 125 s
    "tests/test_train_parallel.py::test_bad_input_in_a_worker",  # 46 s
    # two torchrun agents as two nodes (static rendezvous on 127.0.0.1) and a one-process reference: 187 s (busy)
    "tests/test_train_multinode.py::test_two_nodes",
    "tests/test_train_multinode.py::test_a_killed_node",  # two attempts of a two-node group: 77 s
    # Two torchrun processes behind throttled storage plus a one-process reference; the throttles must outlast a
    # 5 s process-group timeout set above the workers' start-up skew: 190 s on 2 busy cores.
    "tests/test_train_parallel.py::test_no_process_waits_on_slow_storage",
    "tests/test_train_moe.py::test_a_mixtral_with_an_idle_expert",  # two torchrun processes: 77 s (machine busy)
    "tests/test_train_moe.py::test_ddp_without_the_search",  # two DDP models in a subprocess: 38 s (machine busy)
    "tests/test_eval_ml.py::test_the_better_trained_model_wins",  # trains two models first: 184 s
    "tests/test_eval_ml.py::test_cli_with_ragas_metrics",  # 67 s
    "tests/test_eval_ml.py::test_two_identical_models_tie",  # 19 s
    "tests/test_eval_ml.py::test_judge_failures_end_in_retries",  # 12 s
    "tests/test_train.py::test_resume_after_sigkill",  # 136 s
    # SIGTERM mid-run, the retry and a reference run: 512 s on 2 cores busy with other tests (87 s before, no reference).
    "tests/test_train.py::test_sigterm_saves_the_step_in_flight",
    "tests/test_train_preemption.py::test_two_gloo_processes",  # two spawned processes importing transformers: 54 s
    "tests/test_train.py::test_packing_trains_padding_free",  # 18 s
    "tests/test_train.py::test_a_retry_after_the_last_checkpoint",  # 12 s
    # a real HF Trainer (8 steps, four 1 s evaluations) checks the callbacks' order: 35 s on 2 busy cores
    "tests/test_train_progress.py::test_a_real_trainer_reports_its_step_time_without_the_evaluations",
    "tests/test_real_model.py::test_lora_fine_tunes",  # 42 s + 37 s
    "tests/test_real_model.py::test_qlora_fine_tunes",
    "tests/test_real_model.py::test_the_evaluator_answers",  # 10 s
    "tests/test_storage_faults.py::test_storage_gone_at_random_points",  # 19 s
    "tests/test_storage_faults.py::test_training_through_flaky_storage",  # 8 s
    # A 160 MB repository staged, cut, resumed and reused through the local hub and MinIO: 13 to 19 s.
    "tests/test_staging_resume.py::test_a_cut_copy_resumes_with_only_the_missing_files_and_a_second_comparison_downloads_nothing",
    "tests/test_api_fuzz.py",  # 2,500 mutated specs and 30 through kubectl: 60 to 135 s
    "tests/test_data_json.py::test_a_2gb_json_array_streams_in_the_memory_the_json_lines_reader_needs",  # 2 GB file: 13 to 28 s
    "tests/test_example_flagship.py::test_the_flagship_example_gets_past_prepare",  # a prepare process: 17 to 93 s
    "tests/test_example_flagship.py::test_without_the_hub_token",  # a prepare process: 3 to 51 s
)

FIRST = "tests/test_cluster_lifecycle.py"  # brings up its own cluster: before the session's cluster starts


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test belongs to exactly one level, so `make test` (-m "unit or ml or cluster") runs them all;
    the cluster lifecycle test runs first, and the tests that install Kueue and JobSet into the session cluster (the
    `kueue` fixture, which stays installed) run last: every other test sees a cluster without them, as before."""
    items.sort(key=lambda item: (not item.nodeid.startswith(FIRST), "kueue" in getattr(item, "fixturenames", ())))
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
        levels = [m.name for m in item.iter_markers() if m.name in LEVELS]
        if len(set(levels)) != 1:
            raise pytest.UsageError(f"{item.nodeid}: mark it with exactly one of {', '.join(LEVELS)} (has {levels or 'none'})")
