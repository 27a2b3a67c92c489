"""A thin wrapper over HF `tokenizers` with the chat template of `tokenizer_config.json`."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, tokenizer_file: str | Path, tokenizer_config: dict[str, Any] | None = None,
                 eos_token_ids: tuple[int, ...] = ()):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(tokenizer_file)
        if not path.exists():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"cannot load {path}: {e}") from None
        self.config = tokenizer_config or {}
        self.chat_template: str | None = self.config.get("chat_template")
        eos = set(eos_token_ids)
        tok = self._token_text(self.config.get("eos_token"))
        if tok is not None and self._tok.token_to_id(tok) is not None:
            eos.add(self._tok.token_to_id(tok))
        self.eos_token_ids = tuple(sorted(eos))

    @classmethod
    def from_checkpoint_dir(cls, path: str | Path, eos_token_ids: tuple[int, ...] = ()) -> "Tokenizer":
        path = Path(path)
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        return cls(path / "tokenizer.json", cfg, eos_token_ids)

    @staticmethod
    def _token_text(tok) -> str | None:
        if isinstance(tok, dict):
            return tok.get("content")
        return tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Renders messages with the model's Jinja chat template (as HF does)."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template; drop --chat")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise TokenizerError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            template = env.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"invalid chat template: {e}") from None
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.config.get("bos_token")) or "",
            eos_token=self._token_text(self.config.get("eos_token")) or "",
        )

    def encode_chat(self, user_message: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_message}]
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)
