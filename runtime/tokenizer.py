"""The backbone's tokenizer, read from local files only (`tokenizer.json`)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from muxtune.common.text import clip_line, quote

from .models.loading import read_json_object


class TextTokenizer:
    """A `tokenizers` tokenizer plus the end-of-sequence id the spec's tokenization rules use."""

    def __init__(self, tokenizer: Tokenizer, eos_token_id: int | None) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = eos_token_id

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`; with `add_special_tokens` the tokenizer's own template (e.g. BOS)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_many(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        """`encode` of each text, in one call (the tokenizer encodes them on all cores)."""
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(model_dir: str | Path) -> TextTokenizer:
    """Load `tokenizer.json` from a model directory; EOS from tokenizer_config.json or config.json."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer file not found (a model directory needs tokenizer.json)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception type
        raise ValueError(f"{path}: not a valid tokenizer file: {clip_line(str(exc), 300)}") from None
    return TextTokenizer(tokenizer, _eos_token_id(model_dir, tokenizer))


def _eos_token_id(model_dir: Path, tokenizer: Tokenizer) -> int | None:
    """EOS from tokenizer_config.json's `eos_token`, else config.json's `eos_token_id`; ValueError
    names the file when it is not a JSON object or the id is not in the tokenizer's vocabulary."""
    config_path = model_dir / "tokenizer_config.json"
    if config_path.is_file():
        eos = read_json_object(config_path).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tokenizer.token_to_id(eos) is not None:
            return tokenizer.token_to_id(eos)
    model_config = model_dir / "config.json"
    if model_config.is_file():
        eos_id = read_json_object(model_config).get("eos_token_id")
        if isinstance(eos_id, list):
            eos_id = eos_id[0] if eos_id else None
        if isinstance(eos_id, int) and not isinstance(eos_id, bool):
            vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
            if not 0 <= eos_id < vocab_size:
                raise ValueError(
                    f"{model_config}: eos_token_id {quote(eos_id)} is not a token id of the tokenizer "
                    f"(0 to {vocab_size - 1})"
                )
            return eos_id
    return None
