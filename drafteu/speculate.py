"""`drafteu speculate`: the draft ensemble decodes an answer speculatively for the target and scores
every emitted token's EU on the way (``spec_decoding.SpeculativeDecoder``); the JSON of `drafteu
score` plus a ``speculative`` block."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from drafteu.errors import DraftEUError
from drafteu.hardware import DEVICE_HELP
from drafteu.spec_decoding import SpeculateOptions, SpeculativeDecoder


@dataclass(kw_only=True)
class SpeculateConfig(SpeculateOptions):
    """`drafteu speculate`: speculative decoding by the draft ensemble, EU on every emitted token."""

    question: str = field(metadata={"help": "the question (problem text) to answer"})
    drafts: Path = field(metadata={"help": "a reproduce run directory or a drafts directory (as for score)"})
    target: str = field(default="embedded", metadata={"help": "target model: embedded, hub id, local dir or .gguf"})
    proxy: Path | None = field(default=None, metadata={"help": "the proxy (train-proxy output) "
                                                               "when DRAFTS is a drafts directory"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy (output identical to the target's greedy "
                                                      "decoding); > 0 samples with the speculative-sampling rule"})
    max_new_tokens: int = field(default=256, metadata={"help": "length limit of the answer"})
    shots: int = field(default=2, metadata={"help": "worked examples before the question (0..2)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    scale: float = field(default=0.5, metadata={"help": "EU (nats) shown as the reddest colour while streaming"})
    dtype: str = field(default="auto", metadata={"help": "target dtype: auto, float32, bfloat16, float16"})
    draft_dtype: str = field(default="auto", metadata={"help": "drafts' dtype: auto, float32, bfloat16, float16 "
                                                       "(bfloat16: faster multi-row draft steps on CPUs with AMX, see "
                                                       "docs/benchmarks.md; the target still decides every token and "
                                                       "the EU math stays float32)"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    json: Path | None = field(default=None, metadata={"help": "write the result (score's JSON shape) here"})

    def __post_init__(self):
        super().__post_init__()
        if not self.question or not self.question.strip():
            raise DraftEUError("--question is empty; pass the problem text")
        if self.max_new_tokens < 1:
            raise DraftEUError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise DraftEUError(f"--temperature must be >= 0, got {self.temperature}")



def run(cfg: SpeculateConfig, on_pieces=None) -> dict:
    """Load target and drafts, decode the answer speculatively, return (and optionally write) the
    JSON of `drafteu score` plus a ``speculative`` block (acceptance, tokens/s, settings).
    ``on_pieces(texts, variance, bias)`` streams each round's finished tokens as text."""
    from drafteu import data, estimators, models, rundir
    from drafteu.answers import to_json
    from drafteu.data import StreamPieces, token_pieces
    from drafteu.estimators import TokenScores
    from drafteu.fileio import write_json
    from drafteu.methods import ESTIMATORS, named

    if cfg.json is not None and Path(cfg.json).is_dir():
        raise DraftEUError(f"--json {cfg.json} is a directory; give a file path")
    drafts_dir, proxy_dir = rundir.resolve_drafts(cfg.drafts, cfg.proxy)
    bias = cfg.bias if cfg.bias != "auto" else ("proxy" if proxy_dir is not None else "target")
    if bias == "proxy" and proxy_dir is None:
        raise DraftEUError("--bias proxy needs a proxy: pass a run directory with proxy/, or --proxy DIR")
    if cfg.eu and bias == "proxy" and estimators.proxy_on_draft_base(proxy_dir) is not None:
        raise DraftEUError(f"the proxy {proxy_dir} sits on the draft base (proxy.base: draft_base); speculative "
                           "decoding takes p_mix from the target's verification forward, so it needs a proxy on the "
                           "target: pass --bias target, or --proxy DIR of a proxy trained with base: target")
    lm = models.load(cfg.target, dtype=cfg.dtype, device=cfg.device)
    prompt_ids = data.format_prompt(lm.tokenizer, cfg.question, data.shots_for("score", cfg.shots))
    models.check_context(lm.model.config, len(prompt_ids) + cfg.max_new_tokens + cfg.gamma,
                         "the prompt + --max-new-tokens + --gamma", "shorten the question or lower --max-new-tokens",
                         cfg.target)
    ens = ESTIMATORS[named("estimate")].build(estimators.BuildContext(
        target=lm, drafts=drafts_dir, proxy=proxy_dir if cfg.eu and bias == "proxy" else None, device=cfg.device,
        dtype=cfg.draft_dtype))
    dec = SpeculativeDecoder.from_ensemble(ens, ens.target, dataclasses.replace(
        SpeculateOptions(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(SpeculateOptions)}), bias=bias))
    eos = models.eos_ids(lm.model, lm.tokenizer)
    on_tokens = None
    if on_pieces is not None:
        pieces_of = StreamPieces(lm.tokenizer)

        def on_tokens(ids, var, bias):
            on_pieces(pieces_of(ids), var, bias)
    res = dec.generate(prompt_ids, cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed, eos_ids=eos,
                       on_tokens=on_tokens, stops=data.TextStops(lm.tokenizer, data.turn_stops(lm.tokenizer)))
    answer = lm.tokenizer.decode(res.token_ids, skip_special_tokens=True)
    pieces = token_pieces(lm.tokenizer, res.token_ids)
    method = f"speculative (drafts {ens.method}, bias: {bias})"
    if cfg.eu:
        result = to_json(cfg.question, answer, method, cfg.target,
                         TokenScores(res.token_ids, res.eu, res.variance, res.bias), pieces)
    else:
        result = {"question": cfg.question, "answer": answer, "method": method, "target": cfg.target,
                  "tokens": [{"id": int(t), "text": p} for t, p in zip(res.token_ids, pieces, strict=True)]}
    if cfg.eu and res.token_ids:
        result["diagnostic"] = estimators.bias_diagnostic(res.variance, res.bias, ens.base_kl, ens.proxy_fit)
    result["speculative"] = {
        # gamma: the fixed draft length, or the first round's when adaptive; gamma_mean: what the rounds proposed
        "gamma": cfg.gamma, "adaptive": cfg.adaptive, "gamma_max": cfg.gamma_max,
        "gamma_mean": res.proposed / res.rounds if res.rounds else None, "propose": cfg.propose, "bias": bias,
        "eu": cfg.eu, "temperature": cfg.temperature,
        "draft_dtype": cfg.draft_dtype, "compiled": dec.compile,
        "proposed": res.proposed, "accepted": res.accepted, "acceptance": res.acceptance, "rounds": res.rounds,
        "tokens": len(res.token_ids), "seconds": res.seconds, "tokens_per_s": res.tokens_per_s,
        "finish": res.finish, **res.timings,
    }
    if cfg.json is not None:
        write_json(cfg.json, result)
    return result
