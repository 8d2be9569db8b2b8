"""Choose the camera motion for an image with Qwen2.5-VL, by answer likelihood (never free text).

The eight labels of :data:`d4d.geometry.motions.MOTIONS` (``reference.md`` section 2) are scored as
*answers*: for each label the model's log-likelihood of the answer tokens (the label's phrase, e.g.
``"zoom in"``, followed by the end-of-turn token ``<|im_end|>``) after a chat prompt that holds the
image and an instruction listing the eight phrases. The probabilities are
``softmax(total log-likelihood)`` over the eight candidates.

No length normalisation by default: with the end-of-turn token included, the total log-likelihood
is ``log p(answer | image, instruction)`` of a complete answer, so the softmax is that distribution
renormalised over the eight allowed answers (a proper posterior). Dividing by the token count would
stop it being a probability and favour multi-token phrases whose later tokens are near-certain
("zoom" -> "in"); ``length_normalize=True`` is offered for comparison only.

Shared prefix: the image and prompt (the long part, hundreds of vision tokens) are run once with
``use_cache=True``; the KV cache is repeated along the batch for the eight candidates, which then
need one short batched forward over their own 1-4 tokens. :func:`score_naive` runs the eight full
sequences independently and is the reference the tests compare against.

Prompt format: the Qwen2.5-VL chat template (``<|im_start|>role\\n...<|im_end|>\\n``, the image as
``<|vision_start|><|image_pad|>*N<|vision_end|>``), written out here so that only the tokenizer and
the image processor are needed, not the video processor that needs torchvision.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from d4d.geometry.motions import MOTIONS
from d4d.utils.errors import UserError
from d4d.utils.logging import get_logger

log = get_logger(__name__)

# The answer phrase of each label (what a person would write), in MOTIONS order.
MOTION_PHRASES: dict[str, str] = {
    "zoom_in": "zoom in",
    "zoom_out": "zoom out",
    "turn_left": "turn left",
    "turn_right": "turn right",
    "orbit": "orbit",
    "look_up": "look up",
    "look_down": "look down",
    "stationary": "stationary",
}
assert tuple(MOTION_PHRASES) == MOTIONS

DEFAULT_INSTRUCTION = (
    "You are directing a short video that starts from this image. Which camera motion shows the "
    "scene best? Answer with exactly one of: {options}."
)
SYSTEM_MESSAGE = "You are a helpful assistant."
END_OF_TURN = "<|im_end|>"
DEFAULT_MAX_PIXELS = 448 * 448  # ~256 vision tokens: enough to judge the layout of a scene


def build_instruction(prompt: str | None = None, instruction: str | None = None) -> str:
    """The user turn's text: ``instruction`` (default :data:`DEFAULT_INSTRUCTION`, ``{options}``
    filled with the eight phrases) plus, when given, the video's text prompt as context."""
    text = (instruction or DEFAULT_INSTRUCTION).replace("{options}", ", ".join(MOTION_PHRASES.values()))
    if prompt:
        text = f"The video should show: {prompt.strip()}\n{text}"
    return text


def chat_text(user_text: str, num_image_tokens: int) -> str:
    """Qwen2.5-VL chat prompt with one image before ``user_text``, ending where the answer starts."""
    image = "<|vision_start|>" + "<|image_pad|>" * num_image_tokens + "<|vision_end|>"
    return (f"<|im_start|>system\n{SYSTEM_MESSAGE}<|im_end|>\n"
            f"<|im_start|>user\n{image}{user_text}<|im_end|>\n"
            f"<|im_start|>assistant\n")


@dataclasses.dataclass
class MotionScores:
    """Per-label scores, in :data:`MOTIONS` order.

    ``log_likelihood``: total log-probability (nats) of each answer's tokens; ``num_tokens``: answer
    length in tokens (including ``<|im_end|>``); ``probabilities``: softmax over the eight of the
    total (or, with ``length_normalized``, of the per-token mean).
    """

    labels: tuple[str, ...]
    log_likelihood: torch.Tensor  # (8,) float64
    num_tokens: torch.Tensor  # (8,) int
    probabilities: torch.Tensor  # (8,) float64, sums to 1
    length_normalized: bool = False

    @property
    def best(self) -> str:
        return self.labels[int(self.probabilities.argmax())]

    def as_dict(self) -> dict[str, float]:
        return {label: float(p) for label, p in zip(self.labels, self.probabilities)}


def encode_prompt(tokenizer, image_processor, image, user_text: str, image_token_id: int,
                  merge_size: int) -> dict[str, torch.Tensor]:
    """One image + user text -> model inputs for the shared prefix (batch 1).

    Args:
        image: a PIL image or a uint8 ``(H, W, 3)`` RGB tensor / array.
        image_token_id: the model's ``<|image_pad|>`` id (checked against the tokenizer).
        merge_size: the vision tower's ``spatial_merge_size`` (patches merged per token, per side).

    Returns ``input_ids (1, L)``, ``attention_mask (1, L)``, ``mm_token_type_ids (1, L)`` (1 on image
    tokens), ``pixel_values (P, C*T*p*p)`` and ``image_grid_thw (1, 3)``.
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        array = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        image = Image.fromarray(array.astype(np.uint8, copy=False))
    vision = image_processor(images=[image.convert("RGB")], return_tensors="pt")
    grid = vision["image_grid_thw"]
    num_tokens = int(grid.prod()) // merge_size**2
    text = chat_text(user_text, num_tokens)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    found = int((ids == image_token_id).sum())
    if found != num_tokens:
        raise UserError(f"tokenizer does not map '<|image_pad|>' to the model's image_token_id "
                        f"{image_token_id} "
                        f"({found} of {num_tokens} image tokens found): tokenizer and model do not match")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == image_token_id).int(),
            "pixel_values": vision["pixel_values"], "image_grid_thw": grid}


def candidate_token_ids(tokenizer, phrases=tuple(MOTION_PHRASES.values())) -> list[list[int]]:
    """Answer token ids per phrase: ``phrase + <|im_end|>``, tokenized without special prefixes."""
    out = []
    for phrase in phrases:
        ids = tokenizer(phrase + END_OF_TURN, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            raise UserError(f"tokenizer turns the answer {phrase!r} into {len(ids)} token(s)")
        out.append(list(ids))
    return out


def _pad(candidates: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad candidate ids -> ``ids (n, T)`` and ``mask (n, T)`` (1 on real tokens)."""
    width = max(len(c) for c in candidates)
    ids = torch.full((len(candidates), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(candidates):
        ids[i, : len(c)] = torch.tensor(c, device=device)
        mask[i, : len(c)] = 1
    return ids, mask


def _to(inputs: dict, device, dtype) -> dict:
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            for k, v in inputs.items()}


@torch.inference_mode()
def score_shared_prefix(model, inputs: dict, candidates: list[list[int]]) -> torch.Tensor:
    """Total log-likelihood ``(n,)`` (float64) of each candidate, encoding image + prompt once.

    One forward over the prefix (``L`` tokens) with explicit M-RoPE positions from
    ``get_rope_index``; its KV cache is repeated ``n`` times and one batched forward runs the
    candidates' first ``T - 1`` tokens (right-padded; padding sits after every real token, so
    causality keeps it out of the real tokens' logits). Token ``j`` of a candidate gets text
    position ``L + j + rope_delta``, as in the model's own incremental decoding.
    """
    device, dtype = model.device, model.dtype
    inputs = _to(inputs, device, dtype)
    prefix_len = inputs["input_ids"].shape[1]
    positions, delta = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                position_ids=positions,
                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                use_cache=True, logits_to_keep=1)
    first = out.logits[0, -1].double().log_softmax(-1)  # (V,) next-token distribution after the prompt
    n = len(candidates)
    ids, mask = _pad(candidates, pad_id=candidates[0][0], device=device)
    token_logp = torch.zeros(ids.shape, dtype=torch.float64, device=device)
    token_logp[:, 0] = first[ids[:, 0]]
    if ids.shape[1] > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        feed = ids[:, :-1]
        steps = torch.arange(prefix_len, prefix_len + feed.shape[1], device=device)
        pos = (steps[None, None, :] + delta.to(device).view(1, -1, 1)).expand(3, n, -1)
        attn = torch.cat([inputs["attention_mask"].expand(n, -1), mask[:, :-1]], dim=1)
        rest = model(input_ids=feed, attention_mask=attn, position_ids=pos, past_key_values=cache,
                     use_cache=False).logits.double().log_softmax(-1)  # (n, T-1, V)
        token_logp[:, 1:] = rest.gather(-1, ids[:, 1:, None])[..., 0]
    return (token_logp * mask).sum(1).cpu()


@torch.inference_mode()
def score_naive(model, inputs: dict, candidates: list[list[int]]) -> torch.Tensor:
    """Reference: total log-likelihood ``(n,)`` from ``n`` independent full forwards (image each time),
    positions computed by the model itself."""
    device, dtype = model.device, model.dtype
    inputs = _to(inputs, device, dtype)
    prefix = inputs["input_ids"]
    prefix_len = prefix.shape[1]
    totals = []
    for cand in candidates:
        c = torch.tensor([cand], device=device)
        ids = torch.cat([prefix, c], dim=1)
        mm = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(c, dtype=torch.int)], dim=1)
        model.model.rope_deltas = None  # no stale state from an earlier call
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                       pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                       use_cache=False).logits
        logp = logits[0, prefix_len - 1 : -1].double().log_softmax(-1)  # predicts the candidate tokens
        totals.append(logp.gather(-1, c[0, :, None]).sum())
    return torch.stack(totals).cpu()


def probabilities(log_likelihood: torch.Tensor, num_tokens: torch.Tensor, length_normalize: bool = False):
    """Softmax over candidates of the total (default) or per-token mean log-likelihood."""
    score = log_likelihood / num_tokens if length_normalize else log_likelihood
    return score.double().softmax(-1)


class VLMSelector:
    """Qwen2.5-VL + tokenizer + image processor; :meth:`scores` rates the eight motions for an image."""

    def __init__(self, model, tokenizer, image_processor):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.candidates = candidate_token_ids(tokenizer)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str = "cpu", dtype: str = "auto",
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> "VLMSelector":
        """Load from a local directory or a hub id (weights, tokenizer, ``preprocessor_config.json``)."""
        from d4d.selectors.loading import load_qwen2_5_vl

        return cls(*load_qwen2_5_vl(name_or_path, device=device, dtype=dtype, max_pixels=max_pixels))

    def encode(self, image, prompt: str | None = None, instruction: str | None = None) -> dict:
        cfg = self.model.config
        return encode_prompt(self.tokenizer, self.image_processor, image,
                             build_instruction(prompt, instruction), cfg.image_token_id,
                             cfg.vision_config.spatial_merge_size)

    def scores(self, image, prompt: str | None = None, instruction: str | None = None,
               length_normalize: bool = False, shared_prefix: bool = True) -> MotionScores:
        """Image (PIL or uint8 ``(H, W, 3)``) -> :class:`MotionScores` over :data:`MOTIONS`."""
        inputs = self.encode(image, prompt, instruction)
        log.info("scoring %d motions: %d prompt tokens (%d image tokens), %s", len(MOTIONS),
                 inputs["input_ids"].shape[1], int(inputs["mm_token_type_ids"].sum()),
                 "shared prefix" if shared_prefix else "naive")
        score = score_shared_prefix if shared_prefix else score_naive
        ll = score(self.model, inputs, self.candidates)
        n = torch.tensor([len(c) for c in self.candidates])
        return MotionScores(MOTIONS, ll, n, probabilities(ll, n, length_normalize), length_normalize)


def is_local(name_or_path: str) -> bool:
    """A path-like argument (exists, or starts with ``.``/``/``/``~``) rather than a hub id."""
    return Path(name_or_path).expanduser().exists() or name_or_path.startswith((".", "/", "~"))
