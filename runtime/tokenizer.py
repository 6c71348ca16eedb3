"""Prompt cleaning and umT5 tokenization, as Wan2.1 does it, through Hugging Face `tokenizers`.

The model folder's `google/umt5-xxl/` holds `tokenizer.json` (with spiece.model, tokenizer_config.json
and special_tokens_map.json beside it); `tokenizers` reads tokenizer.json directly, without torch,
transformers or sentencepiece. A prompt is cleaned (HTML entities unescaped twice, runs of whitespace
made one space, ends stripped), tokenized, cut to text_len − 1 pieces, given the EOS token `</s>`,
and padded with `<pad>` to text_len — what transformers' T5 tokenizer does with
padding="max_length", truncation=True, max_length=text_len, which the reference calls.

Not done: the reference also runs `ftfy.fix_text` (repairs mojibake such as "Ã©" for "é"); prompts
typed as proper Unicode are unaffected.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer as HFTokenizer

from .errors import CheckpointError, InputError
from .model_folder import TOKENIZER_FILE, TOKENIZER_FOLDER

__all__ = ["Tokenizer", "clean_prompt"]


def clean_prompt(text: str) -> str:
    """HTML-unescape twice (prompts scraped from the web are often escaped twice), then collapse every
    run of whitespace to one space and strip the ends."""
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def _special_token(folder: Path, name: str, default: str) -> str:
    # special_tokens_map.json or tokenizer_config.json name the token as a string or {"content": ...}.
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / file
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text()).get(name)
        except (OSError, ValueError, AttributeError, RecursionError) as err:
            raise CheckpointError(f"{path}: cannot read: {err}") from None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return default


class Tokenizer:
    """Callable: prompts -> (ids [B, text_len] int64, mask [B, text_len] int64, lengths [B] int64).

    `lengths` counts the real tokens including EOS; the T5 output is trimmed to it.
    """

    def __init__(self, tokenizer: HFTokenizer, *, eos_id: int, pad_id: int, text_len: int = 512):
        if text_len < 1:
            raise ValueError(f"text_len must be at least 1 (room for EOS), got {text_len}")
        # Padding, truncation and the EOS are done here, so settings stored in tokenizer.json are off.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer, self.eos_id, self.pad_id, self.text_len = tokenizer, eos_id, pad_id, text_len

    @classmethod
    def from_folder(cls, path: str | Path, text_len: int = 512) -> "Tokenizer":
        """Load the tokenizer folder (`google/umt5-xxl`, or a model folder holding it).

        Raises CheckpointError naming the file when tokenizer.json is absent or unreadable, or when it
        lacks the EOS or pad token.
        """
        folder = Path(path)
        if not (folder / TOKENIZER_FILE).is_file() and (folder / TOKENIZER_FOLDER / TOKENIZER_FILE).is_file():
            folder = folder / TOKENIZER_FOLDER
        file = folder / TOKENIZER_FILE
        if not file.is_file():
            raise CheckpointError(f"{file}: tokenizer file not found (expected the umT5 tokenizer folder "
                                  f"{TOKENIZER_FOLDER}/ of the model folder)")
        try:
            tokenizer = HFTokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise CheckpointError(f"{file}: cannot load: {str(err).splitlines()[0] if str(err) else err}") from None
        ids = {}
        for name, default in (("eos_token", "</s>"), ("pad_token", "<pad>")):
            token = _special_token(folder, name, default)
            ids[name] = tokenizer.token_to_id(token)
            if ids[name] is None:
                raise CheckpointError(f"{file}: has no token {token!r} (the {name})")
        return cls(tokenizer, eos_id=ids["eos_token"], pad_id=ids["pad_token"], text_len=text_len)

    def count_tokens(self, prompt: str) -> int:
        """Tokens of the cleaned prompt, without truncation and without the EOS."""
        return len(self.tokenizer.encode(clean_prompt(prompt), add_special_tokens=False).ids)

    def __call__(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [N, text_len] int64, padded with the pad id; mask [N, text_len], 1 for real tokens, EOS
        included; lengths [N], real tokens per prompt) for N cleaned prompts (`clean_prompt`), each cut to
        text_len − 1 pieces before its EOS."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        encodings = self.tokenizer.encode_batch([clean_prompt(p) for p in prompts], add_special_tokens=False)
        ids = torch.full((len(prompts), self.text_len), self.pad_id, dtype=torch.int64)
        lengths = torch.empty(len(prompts), dtype=torch.int64)
        for row, encoding in enumerate(encodings):
            pieces = encoding.ids[:self.text_len - 1] + [self.eos_id]
            ids[row, :len(pieces)] = torch.tensor(pieces, dtype=torch.int64)
            lengths[row] = len(pieces)
        mask = (torch.arange(self.text_len) < lengths[:, None]).to(torch.int64)
        return ids, mask, lengths
