"""Built-in stages, installed as ``curate.stages``.

Each entry maps a stable YAML ``type:`` name to a lazy ``module:Class``
reference; modules are imported only when a pipeline uses them, and heavy
dependencies are imported inside ``setup()``.
"""

BUILTIN_STAGES: dict[str, str] = {
    "text_stats": "curate.stages.text_stats:TextStatsAnnotator",
    "length_filter": "curate.stages.length_filter:LengthFilter",
    "exact_dedup": "curate.stages.exact_dedup:ExactDedup",
    "minhash_dedup": "curate.stages.minhash_dedup:MinHashDedup",
    "image_filter": "curate.stages.image_filter:ImageFilter",
    "gopher_quality": "curate.stages.quality_filters:GopherQuality",
    "gopher_repetition": "curate.stages.quality_filters:GopherRepetition",
    "c4_quality": "curate.stages.quality_filters:C4Quality",
    "fineweb_quality": "curate.stages.quality_filters:FineWebQuality",
    "lang_id": "curate.stages.fasttext_stages:LangId",
    "lang_filter": "curate.stages.fasttext_stages:LangFilter",
    "fasttext_quality": "curate.stages.fasttext_stages:FastTextQuality",
    "perplexity": "curate.stages.fasttext_stages:Perplexity",
    "score_filter": "curate.stages.score_filters:ScoreFilter",
    "percentile_filter": "curate.stages.score_filters:PercentileFilter",
    "percentile_bucket": "curate.stages.score_filters:PercentileBucket",
    "clip_score": "curate.stages.clip_score:ClipScore",
    "basic_filter": "curate.stages.basic_filter:BasicFilter",
    "mllm_score": "curate.stages.mllm_score:MllmScore",
    "capability_score": "curate.stages.capability_score:CapabilityScore",
    "capability_select": "curate.stages.capability_select:CapabilitySelect",
    "decontaminate": "curate.stages.decontaminate:Decontaminate",
    "instruction_synth": "curate.stages.instruction_synth:InstructionSynth",
    "judge_score": "curate.stages.judge_score:JudgeScore",
    "mix": "curate.stages.mix:Mix",
}
