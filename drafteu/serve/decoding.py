"""How `drafteu serve` decodes a batch of generation jobs in its worker: one interface, chosen once.

vLLM hands its serving classes one ``EngineClient`` whatever runs behind it; here the worker hands its
generation jobs to one ``Decoding``, chosen when the models load (``choose``):

- ``Batched``: the jobs that sample alike run as one batch of the generation backend (the HF backend's
  batched ``generate``; row seeds keep each answer independent of its batch), then the whole batch's
  answers are scored together;
- ``Speculative``: each job decodes speculatively by the draft ensemble, its EU (and the target's
  logprobs from the verifying pass) streamed with every round's tokens; what its rounds computed is kept.

A backend with an async engine of its own (vLLM's) decodes on the event loop instead
(``continuous.ContinuousDecoder``); the worker then only finishes its answers.  Either way a job's
decoded choices are ``Decoded`` values, which the worker finishes (cut at a stop string, scored where
decoding did not, summarized) into ``Answer``s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from drafteu.serve.jobs import Answer, Job


@dataclass
class Decoded:
    """One choice as decoded: its token ids (cut at EOS), why it ended ("eos" | "length"), and what
    decoding already computed of it (EU terms, logprobs of its first tokens), or None."""

    token_ids: list[int]
    finish: str
    known: Answer | None = None


class Decoding(Protocol):
    """The worker's generation strategy: ``decode(jobs)`` -> every job's choices (the jobs not
    cancelled; a cancelled one stops at its next step and its choices come back as far as they got).
    ``live``: whether a job's tokens reach its client while it decodes (``Job.on_tokens``);
    ``refuses(job)``: why this strategy cannot run ``job`` (a 400's message and field), or None."""

    live: bool

    def decode(self, jobs: list[Job]) -> list[list[Decoded]]: ...

    def refuses(self, job: Job) -> tuple[str, str] | None: ...


class Batched:
    """Jobs that sample alike (temperature, top-p) as one batch of the generation backend; each cut at
    its own max_tokens.  A job whose client went away ends its rows at the next decoding step."""

    live = False

    def __init__(self, backend, target_context):
        self.backend, self.target_context = backend, target_context

    def refuses(self, job: Job) -> None:
        return None

    @torch.no_grad()
    def decode(self, jobs: list[Job]) -> list[list[Decoded]]:
        from drafteu.generate import Sampling
        from drafteu.posterior import member_seed

        out: list[list[Decoded]] = [[] for _ in jobs]
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            if not job.cancelled:
                groups.setdefault((job.temperature, job.top_p if job.temperature > 0 else 1.0), []).append(i)
        with self.target_context():  # the target answers, the proxy adapter off
            for (temperature, top_p), idx in groups.items():
                rows = [(i, c) for i in idx for c in range(jobs[i].n)]
                longest = max(jobs[i].max_tokens for i in idx)
                seeds = [member_seed("serve", jobs[i].seed, c) for i, c in rows] if temperature > 0 else None
                row_jobs = [jobs[i] for i, _ in rows]
                answers = self.backend.generate([j.prompt_ids for j in row_jobs], Sampling(
                    temperature, top_p, longest, seeds, cancelled=lambda rj=row_jobs: [j.cancelled for j in rj]))
                for (i, _), (ids, finish) in zip(rows, answers, strict=True):
                    if len(ids) > jobs[i].max_tokens:
                        ids, finish = ids[: jobs[i].max_tokens], "length"
                    out[i].append(Decoded(ids, finish))
        return out


class Speculative:
    """Speculative decoding by the draft ensemble, ``gamma`` tokens proposed per round: EU (and, when asked,
    the target's logprobs from its verifying pass) streamed with every round's tokens; the answer keeps what
    its rounds computed (it is not scored again).  ``build(eu)`` gives (the single-request decoder, the
    several-request one or None) with EU on or off - a job asking ``"eu": false`` decodes without the EU's
    work - made once each when first needed.  A lone job decodes on the single-request decoder (its prompt
    cache kept across jobs: a shared system prompt computed once); several decode together on the batched
    one (``spec_decoding_batch``: one forward per step for all of them) where there is one (not for a
    sliding-window model).  One choice per job, no nucleus cut and no stop strings (the decoder's rule); a
    cancelled job stops at its next round."""

    live = True

    def __init__(self, build, tokenizer, eos):
        self.build, self.tokenizer, self.eos = build, tokenizer, eos
        self._decoders: dict[bool, tuple] = {}
        self.decoder, self.batched = self.decoders(True)

    def decoders(self, eu: bool) -> tuple:
        """(single-request decoder, batched decoder or None) with the EU on or off."""
        if eu not in self._decoders:
            self._decoders[eu] = self.build(eu)
        return self._decoders[eu]

    def refuses(self, job: Job) -> tuple[str, str] | None:
        if job.n > 1 or job.top_p < 1 or job.stop:
            return ("n > 1, top_p < 1 and stop need the batched engine (drafteu serve --engine batched)",
                    "n" if job.n > 1 else "top_p" if job.top_p < 1 else "stop")
        return None

    def decode(self, jobs: list[Job]) -> list[list[Decoded]]:
        done = {}
        for eu in (True, False):
            todo = [job for job in jobs if not job.cancelled and bool(job.eu) == eu]
            if not todo:
                continue
            single, batched = self.decoders(eu)
            if batched is None or len(todo) < 2:
                for job in todo:
                    done[id(job)] = self._finish(job, single.generate(**vars(self._request(job)), eos_ids=self.eos))
            else:
                results = batched.generate([self._request(job) for job in todo], eos_ids=self.eos)
                done |= {id(job): self._finish(job, res) for job, res in zip(todo, results, strict=True)}
        return [[done[id(job)]] if id(job) in done else [] for job in jobs]

    def _request(self, job: Job):
        from drafteu.data import StreamPieces, TextStops, turn_stops
        from drafteu.spec_decoding_batch import Request

        pieces = StreamPieces(self.tokenizer)

        def on_tokens(ids, variance, bias, lps=None):
            texts = pieces(ids)
            if job.on_tokens is not None and not job.cancelled:
                job.on_tokens(0, Answer(list(ids), texts, **terms(variance, bias),
                                        logprobs=[c for c, _ in lps] if lps is not None else None,
                                        top=[t for _, t in lps] if lps is not None else None))

        return Request(job.prompt_ids, job.max_tokens, temperature=job.temperature, seed=job.seed,
                       on_tokens=on_tokens, logprobs=job.top_logprobs if job.logprobs or job.top_logprobs else None,
                       cancelled=lambda: job.cancelled,
                       stops=TextStops(self.tokenizer, turn_stops(self.tokenizer) + tuple(job.stop or ())))

    @staticmethod
    def _finish(job: Job, res) -> Decoded:
        known = Answer(list(res.token_ids), [], logprobs=res.logprobs, top=res.top,
                       **(terms(res.variance, res.bias) if job.eu else {}))
        return Decoded(list(res.token_ids), res.finish, known)


def terms(variance, bias, eu=None) -> dict:
    """An answer's EU fields from its (T,) variance and bias terms (and their sum, when the scorer gave
    it); none when either term is missing."""
    if variance is None or bias is None:
        return {}
    return {"eu": (variance + bias if eu is None else eu).tolist(), "variance": variance.tolist(),
            "bias": bias.tolist()}
