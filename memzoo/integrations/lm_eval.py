"""lm-evaluation-harness adapter: evaluate memzoo checkpoints with ``lm_eval`` (optional extra, lm-eval 0.4.x).

"The Language Model Evaluation Harness" (EleutherAI, Gao et al., 2023; ``lm_eval``).  ``MemzooLM``
is a native ``TemplateLM`` (no transformers): loglikelihood, loglikelihood_rolling and greedy
``generate_until`` over a memzoo ``LanguageModel`` with memzoo's byte-level tokenizer.  Importing this
module imports ``lm_eval`` and registers the model name ``memzoo``; nothing else in memzoo imports it.

    import lm_eval, memzoo.integrations.lm_eval as zoo
    lm_eval.simple_evaluate(model=zoo.MemzooLM(checkpoint="runs/train/x"), tasks=["lambada_openai"])

    python -m memzoo.integrations.lm_eval --model memzoo --model_args checkpoint=runs/train/x --tasks ...
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:
    raise ImportError("memzoo.integrations.lm_eval needs lm-eval: pip install 'lm-eval>=0.4,<0.5'") from e

from memzoo.eval.text_niah import load_checkpoint_and_tokenizer
from memzoo.train.data import ByteTokenizer, check_model_vocab

__all__ = ["MemzooLM"]


@register_model("memzoo")
class MemzooLM(TemplateLM):
    """A memzoo LM for lm-eval.

    Args:
        checkpoint: memzoo-train run or checkpoint directory (or pass ``model``).
        model: an in-memory ``LanguageModel`` (tests, notebooks).
        device: torch device string.
        batch_size: requests scored per forward pass (right-padded; padding never affects a causal model).
        max_length: context window in tokens; longer inputs keep their last ``max_length`` tokens.
        eot_token_id: the end-of-text token; default the tokenizer's EOS (memzoo-train separates documents
            with it), or NUL (0) for a byte-level model whose vocabulary has no room for the specials.
        tokenizer: the tokenizer (default: the one exported with ``checkpoint``, memzoo's byte tokenizer for
            ``model=``).
    """

    def __init__(self, checkpoint: str | None = None, model: Any = None, device: str = "cpu",
                 batch_size: int | str = 8, max_length: int | str = 2048, eot_token_id: int | str | None = None,
                 tokenizer: Any = None) -> None:
        super().__init__()
        if (checkpoint is None) == (model is None):
            raise ValueError("pass exactly one of checkpoint= and model=")
        if model is None:
            model, saved = load_checkpoint_and_tokenizer(checkpoint, device)
            tokenizer = tokenizer if tokenizer is not None else saved
        self.model = model.to(device).eval()
        self.tokenizer_ = tokenizer if tokenizer is not None else ByteTokenizer()
        vocab = self.model.config.vocab_size
        check_model_vocab(self.tokenizer_, vocab, "MemzooLM")
        if eot_token_id is None:
            eot_token_id = self.tokenizer_.eos_id if self.tokenizer_.eos_id < vocab else 0
        self.device_ = torch.device(device)
        self.batch_size_ = int(batch_size)
        self.max_length = int(max_length)
        self._eot = int(eot_token_id)
        if self.batch_size_ < 1 or self.max_length < 2:
            raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}")

    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return [int(i) for i in self.tokenizer_.encode(string)]

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer_.decode(tokens)

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding would produce it."""
        out: list[tuple[float, bool]] = []
        for i in range(0, len(pairs), self.batch_size_):
            chunk = pairs[i : i + self.batch_size_]
            for _, cont in chunk:
                if not 0 < len(cont) <= self.max_length:
                    raise ValueError(f"a continuation must have 1..max_length={self.max_length} tokens, "
                                     f"got {len(cont)}")
            # The model reads context + continuation minus its last token; logits at position j score token j+1.
            seqs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for ctx, cont in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s)
            logp = F.log_softmax(self.model(ids.to(self.device_)).logits.float(), dim=-1).cpu()
            for r, (s, (_, cont)) in enumerate(zip(seqs, chunk)):
                n = len(cont)
                rows = logp[r, len(s) - n : len(s)]  # [n, V]
                target = torch.tensor(cont)
                out.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())))
        return out

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results = self._score([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(lp for lp, _ in self._score(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("MemzooLM.generate_until supports greedy decoding only (do_sample=False)")
            ids = self.tok_encode(context)[-max(self.max_length - max_new, 1) :]
            prompt = torch.tensor([ids], device=self.device_)
            gen = self.model.generate(prompt, max_new_tokens=max_new, temperature=0.0)
            text = self.tok_decode(gen[0, len(ids) :].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
            out.append(text)
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
