"""Test order: the slowest files first, so that `pytest -n 2 --dist loadfile` (make test) packs
the two workers evenly instead of ending on one long file. And XLA's CPU backend compiles
without LLVM optimisations: the tests compile hundreds of tiny programs and run each a few
times, so compilation dominates (about 30 % less wall time for a training test on the slower CPU).
Subprocesses inherit the flag (tests/_multidevice.py and launch/local.sh add to XLA_FLAGS)."""
import os

import pytest

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

SLOWEST_FIRST = (
    "test_multihost.py", "test_quickstart.py", "test_smoke.py", "test_train.py", "test_train_tokenizer.py",
    "test_planning.py", "test_benchmarks.py", "test_remote_workdir.py", "test_sample_cli.py", "test_zero_shot.py",
    "test_sharded_sampling.py", "test_inception.py", "test_vqgan.py", "test_transformer.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


@pytest.fixture(scope="module")
def restore_jax_cache_config():
    """Puts JAX's persistent-cache settings back after a module whose training runs changed them."""
    import jax  # not at import time: XLA_FLAGS above must be set before JAX starts

    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def run_process_group(cmd, *, env, timeout: float, name: str = "", cwd=None) -> tuple[int, str]:
    """Runs `cmd` in a new process group -> (return code, stdout + stderr). On timeout the whole group
    is killed and the test fails as a hang; any process left in the group is killed afterwards."""
    import os
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=None if cwd is None else str(cwd))
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{name + ': ' if name else ''}timed out after {timeout}s (hang):\n{output[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, output

