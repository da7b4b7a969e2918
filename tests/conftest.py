import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # 2-core machines: one intra-op thread per test process keeps timings stable and results
    # independent of the machine's core count.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def minilm():
    from loraq_export.models import load_model
    return load_model(None)


@pytest.fixture(scope="session")
def minilm_weights(minilm):
    """The 36 encoder Linear weights of the real MiniLM, (in, out) layout."""
    return {n: m.weight.detach().T.contiguous() for n, m in minilm.module.named_modules()
            if isinstance(m, torch.nn.Linear) and minilm.select(n, m)[0]}

