"""`sparsify generate`: text from any model sparsify reads, and speculative decoding that keeps the
teacher's output: drafted by a draft head, or by a skip model's own gates."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sparsify.errors import SparsifyError
from sparsify.generate_options import GenerateOptions


@dataclass
class GenerateResult:
    prompts: list[str]
    texts: list[str]  # the continuations, without the prompts
    new_tokens: int  # generated tokens over all prompts (up to each one's end of sequence)
    seconds: float  # wall clock of the generation (the model loaded)
    engine: str  # "generate" (transformers), "speculative, transformers" or "speculative, graph engine"
    speculative: dict[str, Any] | None = None  # SpeculativeStats.record()
    draft: str | None = None  # what the draft path ran (DraftPlan.summary)
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def generate(model_ref: str, prompts: list[str], options: GenerateOptions,
             on_status: Callable[[str], None] = lambda text: None) -> GenerateResult:
    import torch

    from sparsify.convert.skip.draft_head import describe as describe_head, draft_head_for
    from sparsify.convert.skip.draft_plan import DraftPlan
    from sparsify.convert.skip.speculative import Sampling, speculative_generate
    from sparsify.sources import load_model, load_tokenizer

    options.validate()
    if not prompts:
        raise SparsifyError("give at least one --prompt")
    device = torch.device("cuda" if options.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if options.device == "auto" else options.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparsifyError("--device cuda, but torch sees no GPU here; use --device cpu")
    on_status("loading the model")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(model_ref, dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(model_ref)
    tokenizer.padding_side = "left"  # generation continues every row from its last column
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = pad
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    # Stop where the plain path stops: the model's generation config may name several end tokens (e.g. <|eot_id|>).
    stops = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
    stops = [stops] if isinstance(stops, int) else list(stops or [])
    generator = torch.Generator(device=device).manual_seed(options.seed)
    sampling = Sampling(options.do_sample, options.temperature, options.top_p)
    on_status("generating")
    head = draft_head_for(model, options.draft) if options.speculative else None
    head, fallback = head_or_gates(model, batch, head, options)
    decoder = head_decoder(model, batch, head, options) if head is not None else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    stats, engine, draft = None, "generate", None
    if head is not None:
        result = decoder.generate(batch["input_ids"], options.max_new_tokens, eos_token_id=stops, pad_token_id=pad)
        engine = "speculative, graph engine" if decoder.use_graph else "speculative, static-cache engine (eager)"
        sequences, stats, draft = result.sequences, result.stats.record(), describe_head(head)
    elif options.speculative:
        plan = DraftPlan.for_model(model, options.draft_threshold)
        decoder, engine_note = graph_decoder(model, batch, plan, options, device)
        fallback = fallback or engine_note
        if decoder is not None:
            result = decoder.generate(batch["input_ids"], options.max_new_tokens, eos_token_id=stops, pad_token_id=pad)
        else:
            result = speculative_generate(model, batch["input_ids"], attention_mask=batch["attention_mask"],
                                          max_new_tokens=options.max_new_tokens, draft_tokens=options.draft_tokens, plan=plan,
                                          sampling=sampling, generator=generator, eos_token_id=stops, pad_token_id=pad)
        engine = "speculative, graph engine" if decoder is not None else "speculative, transformers"
        sequences, stats = result.sequences, result.stats.record()
        draft = plan.summary(len(model.skip_gates()))
    else:
        torch.manual_seed(options.seed)
        with torch.no_grad():
            sequences = model.generate(**batch, max_new_tokens=options.max_new_tokens, do_sample=options.do_sample,
                                       temperature=options.temperature if options.do_sample else None,
                                       top_p=options.top_p if options.do_sample else None, pad_token_id=pad)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    note = verifier_note(model_ref) if options.speculative else None
    new = sequences[:, batch["input_ids"].shape[1]:]
    lengths = [_length(row.tolist(), stops) for row in new]
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(new, lengths)]
    return GenerateResult(prompts, texts, sum(lengths), seconds, engine, stats, draft, [n for n in (note, fallback) if n])


def graph_decoder(model, batch, plan, options: GenerateOptions, device) -> tuple[Any, str | None]:
    """The graph engine's speculative decoder where it runs (--engine graph; auto: on a GPU, greedy,
    prompts of one length), else None; with a note when auto found it does not apply to this model."""
    unpadded = bool(batch["attention_mask"].all())
    if options.engine == "graph" and not unpadded:
        raise SparsifyError("--engine graph needs prompts of one token length (it does not pad); "
                            "use --engine transformers for prompts of different lengths")
    auto = options.engine == "auto" and device.type == "cuda" and unpadded and not options.do_sample
    if options.engine != "graph" and not auto:
        return None, None
    from sparsify.engine.speculative_decode import SpeculativeDecoder

    ids = batch["input_ids"]
    try:
        return SpeculativeDecoder(model, ids.shape[0], ids.shape[1] + options.max_new_tokens, plan, options.draft_tokens), None
    except SparsifyError as error:
        if options.engine == "graph":
            raise
        return None, f"the graph engine does not apply here ({error}); decoded with transformers"


def head_unsuited(batch, options: GenerateOptions) -> str | None:
    """Why a draft head cannot serve this generation, if it cannot."""
    if options.do_sample or options.engine == "transformers":
        return "a draft head drafts on the static-cache engine, greedily; drop --do-sample and --engine transformers"
    if not bool(batch["attention_mask"].all()):
        return "a draft head needs prompts of one token length (the static-cache engine does not pad); give prompts of one length"
    return None


def head_or_gates(model, batch, head, options: GenerateOptions) -> tuple[Any, str | None]:
    """The head where it can serve; with --draft auto, a skip model's gates where it cannot (with a note)."""
    reason = head_unsuited(batch, options) if head is not None else None
    if reason is None:
        ignored = "--draft-threshold is the gates' setting; the draft head drafted" if head is not None and options.draft_threshold else None
        return head, ignored
    from sparsify.convert.skip.draft_plan import has_skip_gates

    if options.draft == "auto" and has_skip_gates(model):
        return None, f"drafted with the gates, not the model's draft head: {reason.split(';')[0]}"
    raise SparsifyError(f"{reason}, or draft with a skip model's gates (--draft gates)")


def head_decoder(model, batch, head, options: GenerateOptions):
    """The static-cache engine's speculative decoder drafting with `head` (a CUDA graph per round on
    a GPU, eager elsewhere): greedy, prompts of one length."""
    from sparsify.engine.speculative_decode import SpeculativeDecoder

    ids = batch["input_ids"]
    return SpeculativeDecoder(model, ids.shape[0], ids.shape[1] + options.max_new_tokens, None, options.draft_tokens, head=head)


def verifier_note(model_ref: str) -> str | None:
    """Why the verified output is not the dense source's, when it is not: training merged LoRA adapters
    into the weights, so every gate open computes the trained model rather than its source."""
    from sparsify.provenance import read_record

    folder = Path(model_ref)
    record = read_record(folder) if (folder / "config.json").exists() else None
    layout = (record or {}).get("layout") or {}
    if (record or {}).get("variant") == "skip" and layout and not layout.get("dense_path"):
        return ("this skip model's training merged LoRA adapters into its weights, so the verified output is its own full path "
                "(every gate open), not its dense source's; train with --lora-rank 0 (gates only) to decode exactly as the source")
    return None


def _length(tokens: list[int], stops: list[int]) -> int:
    """Tokens up to and including the first end of sequence."""
    return next((i + 1 for i, token in enumerate(tokens) if token in stops), len(tokens))
