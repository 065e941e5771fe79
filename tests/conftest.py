"""Shared test set-up. Service fixtures (S3, Slurm) live in their own plugin modules."""
import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = ["tests.s3_fixture", "tests.slurm_fixture"]


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests use tiny tensors on a shared 2-core machine, where OpenMP threads spin-waiting on each other cost
    10-100x; one intra-op thread is fastest. Spawned ranks and subprocesses set their own."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def vq_dir(tmp_path_factory) -> str:
    """A random-init VQ-micro saved with argen.model.save: the tokenizer the tokenize tests encode with."""
    import argen.model as M
    from argen.model.vq import VQ_SIZES, VQModel
    d = tmp_path_factory.mktemp("vq") / "vq-micro"
    torch.manual_seed(0)
    M.save(VQModel(VQ_SIZES["VQ-micro"]), d)
    return str(d)
