"""The Qwen2.5-VL motion selector on a tiny random model built here (no weights downloaded)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from d4d.geometry.motions import MOTIONS
from d4d.selectors.tiny import save_tiny_qwen2_5_vl, tiny_image_processor, tiny_qwen2_5_vl, tiny_tokenizer
from d4d.selectors.vlm import (MOTION_PHRASES, VLMSelector, probabilities, score_naive, score_shared_prefix)
from tests.conftest import run_module


def _image(seed: int, size=(84, 112)) -> np.ndarray:
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def selector() -> VLMSelector:
    tokenizer = tiny_tokenizer()
    return VLMSelector(tiny_qwen2_5_vl(tokenizer), tokenizer, tiny_image_processor())


@pytest.mark.parametrize("prompt", [None, "a living room with a sofa"])
def test_shared_prefix_equals_naive_scoring(selector, prompt):
    inputs = selector.encode(_image(0), prompt=prompt)
    assert int(inputs["mm_token_type_ids"].sum()) == int(inputs["image_grid_thw"].prod()) // 4
    lengths = {len(c) for c in selector.candidates}
    assert len(lengths) > 1, "candidates of different lengths exercise the padding"
    calls = {"vision": 0, "text_tokens": 0}
    model = selector.model

    def count_vision(*_):
        calls["vision"] += 1

    def count_text(module, args, kwargs):
        calls["text_tokens"] += kwargs["inputs_embeds"].shape[:2].numel()

    hooks = [model.model.visual.register_forward_hook(count_vision),
             model.model.language_model.register_forward_pre_hook(count_text, with_kwargs=True)]
    try:
        shared = score_shared_prefix(model, inputs, selector.candidates)
        shared_calls = dict(calls)
        calls.update(vision=0, text_tokens=0)
        naive = score_naive(model, inputs, selector.candidates)
    finally:
        for h in hooks:
            h.remove()
    prefix, longest = inputs["input_ids"].shape[1], max(len(c) for c in selector.candidates)
    # The image and prompt are encoded once; the candidates only add their own tokens.
    assert shared_calls == {"vision": 1, "text_tokens": prefix + 8 * (longest - 1)}
    assert calls["vision"] == 8 and calls["text_tokens"] == sum(prefix + len(c) for c in selector.candidates)
    assert shared.shape == naive.shape == (8,)
    torch.testing.assert_close(shared, naive, rtol=0, atol=1e-4)
    assert shared.max() - shared.min() > 1.0  # the eight scores are distinct, so the check has teeth


def test_candidates_are_answer_phrases_with_end_of_turn(selector):
    tok = selector.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for label, ids in zip(MOTIONS, selector.candidates):
        assert ids[-1] == end
        assert tok.decode(ids[:-1]) == MOTION_PHRASES[label]


def test_scores_depend_on_the_image_and_sum_to_one(selector):
    a = selector.scores(_image(1))
    b = selector.scores(_image(2))
    assert a.labels == MOTIONS
    assert float(a.probabilities.sum()) == pytest.approx(1.0)
    assert not torch.allclose(a.log_likelihood, b.log_likelihood, atol=1e-3)
    assert a.best == MOTIONS[int(a.log_likelihood.argmax())]


def test_length_normalisation_is_softmax_of_mean_log_likelihood():
    ll = torch.tensor([-6.0, -4.0, -9.0], dtype=torch.float64)
    n = torch.tensor([3, 1, 3])
    assert torch.allclose(probabilities(ll, n), torch.softmax(ll, 0))
    normalised = probabilities(ll, n, length_normalize=True)
    assert torch.allclose(normalised, torch.softmax(torch.tensor([-2.0, -4.0, -3.0], dtype=torch.float64), 0))
    assert int(normalised.argmax()) == 0 and int(probabilities(ll, n).argmax()) == 1


def test_cli_loads_a_saved_model_directory(tmp_path):
    model_dir = save_tiny_qwen2_5_vl(tmp_path / "qwen")
    image = tmp_path / "room.png"
    Image.fromarray(_image(3)).save(image)
    out = run_module("d4d.select_vlm", str(image), "--model", str(model_dir), "--json").stdout
    result = json.loads(out.strip().splitlines()[-1])
    probs = result["probabilities"]
    assert list(probs) == list(MOTIONS)
    assert sum(probs.values()) == pytest.approx(1.0)
    assert result["motion"] == max(probs, key=probs.get)
    # The same numbers as the in-process selector built from the same directory.
    sel = VLMSelector.from_pretrained(str(model_dir))
    expected = sel.scores(np.asarray(Image.open(image)))
    got = torch.tensor([result["log_likelihood"][m] for m in MOTIONS], dtype=torch.float64)
    torch.testing.assert_close(got, expected.log_likelihood, rtol=0, atol=1e-4)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from d4d.select_vlm import main

    image = tmp_path / "x.png"
    Image.fromarray(_image(4)).save(image)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cases = [([str(tmp_path / "missing.png"), "--model", str(tmp_path)], "image not found"),
             ([str(image), "--model", str(tmp_path / "nowhere")], "directory not found"),
             ([str(image), "--model", str(tmp_path / "bert")], "model_type is 'bert'"),
             ([str(image), "--model", str(tmp_path), "--dtype", "float8"], "--dtype 'float8'")]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("d4d.select_vlm: error:") and needle in err[-1], err
