import pytest

from tasks.core.config import ConfigError, load_config
from tasks.core.hardware import Probe, decide, probe
from tasks.core.home import Home

CPU = Probe(cuda=False)
H200 = Probe(
    cuda=True,
    cuda_bf16=True,
    gpu_name="NVIDIA H200",
    gpu_memory_gb=139.8,
    unsloth_installed=True,
    bitsandbytes_installed=True,
)


def test_cpu_default_is_peft_float32_with_reason() -> None:
    d = decide(load_config("default"), CPU)
    assert (d.device, d.backend, d.dtype, d.load_in_4bit) == ("cpu", "peft", "float32", False)
    assert "no CUDA" in d.reason and "bf16" in d.reason


def test_this_machine_probe_matches_decision() -> None:
    d = decide(load_config("ci-smoke"), probe())
    assert d.device == ("cuda" if probe().cuda else "cpu")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.backend=unsloth"], "needs a CUDA GPU"),
        (["model.load_in_4bit=true"], "load_in_4bit=true needs CUDA"),
        (["train.optimizer=paged_adamw_8bit"], "adamw_torch"),
        (["model.dtype=bfloat16"], "float32"),
    ],
)
def test_cpu_refuses_what_it_cannot_honour(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        decide(load_config("default", overrides), CPU)


def test_gpu_recipe_on_h200_uses_unsloth_bf16_4bit() -> None:
    d = decide(load_config("llama3-8b-qlora"), H200)
    assert (d.device, d.backend, d.dtype, d.load_in_4bit) == ("cuda", "unsloth", "bfloat16", True)
    assert "H200" in d.reason


def test_auto_without_unsloth_falls_back_to_peft_and_says_why() -> None:
    no_unsloth = Probe(
        cuda=True, cuda_bf16=False, gpu_name="T4", gpu_memory_gb=15.0, bitsandbytes_installed=True
    )
    d = decide(load_config("default", ["train.backend=auto"]), no_unsloth)
    assert (d.backend, d.dtype) == ("peft", "float16")
    assert "Unsloth not installed" in d.reason
    with pytest.raises(ConfigError, match="unsloth is not installed"):
        decide(load_config("default", ["train.backend=unsloth"]), no_unsloth)


def test_a_gpu_pool_run_needs_no_gpu_where_it_is_orchestrated(fresh_home: Home) -> None:
    """The finetune flow of a GPU recipe runs on a CPU node and sends train, export and
    evaluate to the gpu pool: neither preflight nor the run's opening refuses the recipe
    there; the GPU worker that joins the run still decides (and refuses) for itself."""
    from flows.preflight import preflight

    cfg = load_config("gpu-1b", ["orchestration.gpu_pool=gpu"])
    d = decide(cfg, CPU, trains_here=False)
    assert d.device == "cpu" and "'gpu' pool" in d.reason
    assert preflight(cfg, fresh_home, registering=False).hardware.reason == d.reason
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        decide(cfg, CPU)  # the GPU worker's own decision
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        decide(load_config("gpu-1b"), CPU, trains_here=False)  # no pool: it trains here
    assert decide(cfg, H200, trains_here=False).backend == "unsloth"  # one host: as usual
