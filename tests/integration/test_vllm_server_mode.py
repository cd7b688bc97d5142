"""`use_vllm: true, vllm_mode: server` end to end, without vLLM or a GPU: `grpokit train` through the real CLI
against grpokit's own vllm-serve HTTP server, whose backend generates with the in-process sampler on its own
copy of the tiny model and loads the weights the trainer pushes (the part vLLM would do)."""

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grpokit.rollout import vllm_server
from grpokit.rollout.torch_engine import TorchEngine
from grpokit.rollout.vllm_engine import read_safetensors, weights_checksum
from tests.conftest import run_cli, write_jsonl


class TorchBackend:
    """A vllm-serve backend on transformers: what the server does with vLLM, done with grpokit's own sampler."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM

        self.model = str(model_dir)  # the name /health reports, as `grpokit vllm-serve --model` would
        self.module = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.engine = TorchEngine(self.module, pad_token_id=0)
        self.generations = self.loads = 0

    def generate(self, prompt_ids, n, params):
        self.generations += 1
        return self.engine.generate(prompt_ids, n, params)

    def load_weights(self, path):
        weights = dict(read_safetensors(path))
        missing, unexpected = self.module.load_state_dict(weights, strict=False)
        assert not unexpected, unexpected
        self.loads += 1
        return weights_checksum(weights.items())


@pytest.fixture
def server(tiny_model_dir):
    backend = TorchBackend(tiny_model_dir)
    running = vllm_server.serve(backend, "127.0.0.1", 0)
    yield running, backend
    running.shutdown()


def test_training_generates_on_the_server_and_pushes_every_update(tmp_path, tiny_model_dir, server):
    running, backend = server
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"{a} + {b} =", "answer": str(a + b)}
                                           for a in range(4) for b in range(4)])
    (tmp_path / "my_rewards.py").write_text("def text_hash(completions, **kwargs):\n"
                                            "    return [sum(i * ord(c) for i, c in enumerate(t, 1)) % 97 / 97 "
                                            "for t in completions]\n")
    config = {"model": str(tiny_model_dir), "dataset": "train.jsonl", "output_dir": "run", "device": "cpu",
              "reward_funcs": ["my_rewards.text_hash"], "num_generations": 4, "per_device_train_batch_size": 8,
              "max_completion_length": 6, "learning_rate": 1e-2, "max_steps": 3, "seed": 2, "save_steps": None,
              "use_vllm": True, "vllm_mode": "server", "vllm_port": int(running.url.rsplit(":", 1)[1])}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("train", "cfg.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert backend.generations == 3, "every generation ran on the server"
    # one push at start, then one before each later generation (after steps 1 and 2); the last update is not pushed
    # because nothing generates after it
    assert backend.loads == 3
    final = load_file(tmp_path / "run" / "final_model" / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    served = backend.module.state_dict()
    changed = [name for name in final if not torch.equal(final[name], start[name])]
    assert changed, "training changed nothing"
    # the server holds the weights after step 2: different from the start, and what generated step 3's completions
    assert any(not torch.equal(served[name], start[name]) for name in changed)


def test_a_server_serving_another_model_is_refused_before_training(tmp_path, tiny_model_dir, server):
    running, _ = server
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "1 + 1 ="}])
    config = {"model": str(tiny_model_dir) + "/", "dataset": "train.jsonl", "reward_funcs": ["answer_format"],
              "num_generations": 2, "per_device_train_batch_size": 2, "use_vllm": True, "device": "cpu",
              "vllm_port": int(running.url.rsplit(":", 1)[1])}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("train", "cfg.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "serves" in result.stderr, result.stderr
