"""Every usage field the official SDKs define, and what Tollgate does with it.

`tests/test_usage_conformance.py` walks the installed `openai` and `anthropic` SDKs' usage types
(and the Responses output items that carry per-call prices) and fails when a field path exists
there that is in none of the three tables below, or when a path below no longer exists in the
SDK. So an SDK update can never add a charge that is silently ignored.

A path is `<sdk>.<Type>.<field>.<subfield>...`; `[tag]` picks one member of a union discriminated
by its `type` (`anthropic.beta.BetaUsage.iterations[compaction].input_tokens`). Each path is in
exactly one table:

* `PRICED`: the parsers read it today; the value says which `Usage` field (or price) it feeds.
* `NOT_BILLED`: it costs nothing by itself; the value says why (a total, a breakdown already
  priced elsewhere, descriptive data).
* `NOT_YET_PRICED`: it is billed (or may be) but the parsers ignore it; the value names the
  issue item. It must be empty (the conformance test fails otherwise): an entry is a known
  undercharge to fix.

Nothing here is read at request time; this module is data for the conformance test and for
whoever maintains the parsers.
"""

from __future__ import annotations

_ISSUE = "issue 10"

# ---- the two Anthropic usage shapes (Message.usage / message_start) and message_delta's -------
_A_USAGE = ("anthropic.Usage", "anthropic.beta.BetaUsage")
_A_DELTA = ("anthropic.MessageDeltaUsage", "anthropic.beta.BetaMessageDeltaUsage")
_A_ALL = _A_USAGE + _A_DELTA
_A_ITER_TOKENS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
                  "cache_creation.ephemeral_5m_input_tokens", "cache_creation.ephemeral_1h_input_tokens")
_A_BETA = ("anthropic.beta.BetaUsage", "anthropic.beta.BetaMessageDeltaUsage")

_OI = "openai.responses.ResponseOutputItem"  # the Responses API's output items, by `type`

PRICED: dict[str, str] = {
    # OpenAI chat completions (also Gemini's and Workers AI's OpenAI-compatible endpoints): base.openai_usage
    "openai.CompletionUsage.prompt_tokens":
        "Usage.input_tokens, after subtracting cached_tokens and cache_write_tokens (base.openai_usage)",
    "openai.CompletionUsage.prompt_tokens_details.cached_tokens": "Usage.cached_input_tokens, at the cached_input rate",
    "openai.CompletionUsage.prompt_tokens_details.cache_write_tokens":
        "Usage.cache_write_tokens (chat's only TTL is 30 minutes), at the cache_write rate",
    "openai.CompletionUsage.completion_tokens": "Usage.output_tokens, reasoning included",
    "openai.CompletionUsage.completion_tokens_details.reasoning_tokens":
        "Usage.reasoning_tokens: a record breakdown, billed inside output_tokens",
    # OpenAI Responses: base.openai_usage and Responses.usage_from_json
    "openai.responses.ResponseUsage.input_tokens":
        "Usage.input_tokens, after subtracting cached_tokens and cache_write_tokens (base.openai_usage)",
    "openai.responses.ResponseUsage.input_tokens_details.cached_tokens":
        "Usage.cached_input_tokens, at the cached_input rate",
    "openai.responses.ResponseUsage.input_tokens_details.cache_write_tokens":
        "Usage.cache_write_tokens + cache_write_long_tokens (split by cache_write_tokens_details)",
    "openai.responses.ResponseUsage.input_tokens_details.cache_write_tokens_details.ttl_12h_tokens":
        "Usage.cache_write_long_tokens, at the cache_write_long rate",
    "openai.responses.ResponseUsage.input_tokens_details.cache_write_tokens_details.ttl_30m_tokens":
        "Usage.cache_write_tokens, at the cache_write rate (taken as cache_write_tokens - ttl_12h_tokens: the "
        "field itself is not read)",
    "openai.responses.ResponseUsage.output_tokens": "Usage.output_tokens, reasoning included",
    "openai.responses.ResponseUsage.output_tokens_details.reasoning_tokens":
        "Usage.reasoning_tokens: a record breakdown, billed inside output_tokens",
    f"{_OI}[web_search_call]":
        "Usage.tool_calls['web_search'], one fee per item at the table's tools.web_search when the response "
        "has no tool_usage.web_search.num_requests (which wins: it excludes page actions)",
    "openai.responses.Response.tool_usage.web_search.num_requests":
        "Usage.tool_calls['web_search']: the billable searches, at the table's tools.web_search",
    f"{_OI}[code_interpreter_call].container_id":
        "Usage.tool_calls['code_interpreter'] counts distinct containers: one fee per container session",
    **{f"{r}.output_tokens_details.thinking_tokens":
       "Usage.reasoning_tokens: a record breakdown, billed inside output_tokens" for r in _A_ALL},
    f"{_OI}[file_search_call]": "Usage.tool_calls['file_search'], one fee per item at the table's tools.file_search",
    f"{_OI}[code_interpreter_call]":
        "Usage.tool_calls['code_interpreter'], one fee per container session at the table's tools.code_interpreter",
    f"{_OI}[image_generation_call]":
        "Usage.tool_calls['image_generation'], one per item at the table's tools.image_generation (0): the cost "
        "is the image tokens in Response.tool_usage.image_gen",
    # OpenAI embeddings
    "openai.CreateEmbeddingResponse.usage.prompt_tokens": "Usage.input_tokens (Embeddings.usage_from_json)",
    # Anthropic messages: JSON body and message_start (Usage), message_delta (cumulative: counts only grow)
    **{f"{r}.input_tokens": "Usage.input_tokens (anthropic.anthropic_usage)" for r in _A_ALL},
    **{f"{r}.output_tokens": "Usage.output_tokens, thinking included" for r in _A_ALL},
    **{f"{r}.cache_read_input_tokens": "Usage.cached_input_tokens, at the cached_input rate" for r in _A_ALL},
    **{f"{r}.cache_creation_input_tokens":
       "Usage.cache_write_tokens (5-minute) when there is no cache_creation split; with one, the split is used "
       "(in a stream, what it adds beyond message_start's split is 5-minute)" for r in _A_ALL},
    **{f"{r}.cache_creation.ephemeral_5m_input_tokens": "Usage.cache_write_tokens, at the cache_write rate"
       for r in _A_USAGE},
    **{f"{r}.cache_creation.ephemeral_1h_input_tokens":
       "Usage.cache_write_long_tokens, at the cache_write_long (1-hour, 2x input) rate" for r in _A_USAGE},
    **{f"{r}.server_tool_use.web_search_requests":
       "Usage.tool_calls['web_search'], at the table's tools.web_search ($10 per 1,000)" for r in _A_ALL},
    **{f"{r}.server_tool_use.web_fetch_requests":
       "Usage.tool_calls['web_fetch'], at the table's tools.web_fetch (0: web fetch has no per-call charge, "
       "its content is input tokens)" for r in _A_ALL},
    # usage.iterations (beta): what the top level leaves out
    **{f"{r}.iterations[compaction].{f}":
       "added to the top-level Usage (Usage.add): compaction bills at the served model's rates and its tokens "
       "are not in the top-level fields" for r in _A_BETA for f in _A_ITER_TOKENS},
    **{f"{r}.iterations[advisor_message].{f}":
       "Usage.other_models (model, Usage): the advisor sub-inference, at the advisor model's own rates"
       for r in _A_BETA for f in (*_A_ITER_TOKENS, "model")},
    # audio models (chat): the audio part of the totals, at the row's audio rates
    "openai.CompletionUsage.prompt_tokens_details.audio_tokens":
        "Usage.audio_input_tokens (part of input_tokens), at the row's audio_input rate (base.openai_usage)",
    "openai.CompletionUsage.completion_tokens_details.audio_tokens":
        "Usage.audio_output_tokens (part of output_tokens), at the row's audio_output rate",
    # per-request rate modifiers: the response says what was billed
    "openai.ChatCompletion.service_tier":
        "Usage.tier: the row's `tiers` rates for `flex` / `priority` (`fast` is billed and reported as priority); "
        "`default` the row's own; in streams, from any chunk",
    "openai.responses.Response.service_tier":
        "Usage.tier: the row's `tiers` rates for `flex` / `priority`; a tier the row lacks (`ultrafast`) at its own "
        "rates, bounded at gateway.bounds.unpriced_tier_multiplier",
    **{f"{r}.inference_geo":
       "Usage.inference_geo: the row's `inference_geo` multiplier (`us`: 1.1x every rate on Opus 4.6, Sonnet 4.6 and "
       "later models)" for r in _A_USAGE},
    **{f"{r}.speed": "Usage.tier: `fast` at the row's `tiers.fast` rates (fast mode)" for r in _A_USAGE},
    # server-side tools
    f"{_OI}[shell_call]":
        "Usage.tool_calls['shell']: a hosted shell (environment container_reference) once per container session, at "
        "the table's tools.shell (a container already counted for code interpreter is not counted again); a local "
        "environment costs nothing",
    **{f"{_OI}[image_generation_call].{f}":
       "estimate when the response has no tool_usage.image_gen: gpt-image-1's documented image output tokens for "
       "the quality and size (the largest listed, 6,240, when not listed), at the image model's rates"
       for f in ("quality", "size")},
    **{f"{_OI}[image_generation_call].svg_usage.{f}":
       "Usage.other_models (svg_usage.model, Usage): SVG authoring tokens at that model's rates"
       for f in ("input_tokens", "output_tokens", "reasoning_tokens", "model")},
    **{f"openai.responses.Response.tool_usage.image_gen.{f}":
       "Usage.image_gen (ImageGenUsage): at the image model's rates (the image_generation tool's `model`, else "
       "gpt-image-2.6-sunburst): text and image input, their cached reads (taken out of the input; an omitted "
       "cache count bills as uncached) and image / text output (openai.Responses.usage_from_json)" for f in (
           "input_tokens", "output_tokens", "cached_tokens", "input_tokens_details.image_tokens",
           "input_tokens_details.text_tokens", "output_tokens_details.image_tokens",
           "output_tokens_details.text_tokens", "cached_tokens_details.cached_image_tokens",
           "cached_tokens_details.cached_text_tokens")},
    # Anthropic usage.iterations on several models (server-side fallback)
    **{f"{r}.iterations[{t}].model":
       "with server-side fallback (a fallback_message entry, or message entries on several models) each sampling "
       "iteration that names its model is billed at that model's rates: moved from the top level to "
       "Usage.other_models (anthropic._fallback_hops)" for r in _A_BETA for t in ("message", "fallback_message")},
    **{f"{r}.fallback_credit.status[redeemed]":
       "Usage.fallback_credit ('redeemed', in the record): the reprice moves the retry's cache writes for the "
       "prefix warm on the refused model to the cache-read rate (platform.claude.com/docs/en/build-with-claude/"
       "fallback-credit), but the usage does not say how many: they stay at the write rate, an upper bound on the "
       "invoice by at most (write - read) x cache_creation_input_tokens" for r in _A_BETA},
}

NOT_BILLED: dict[str, str] = {
    # totals and breakdowns of something priced elsewhere
    "openai.CompletionUsage.total_tokens": "prompt_tokens + completion_tokens",
    "openai.responses.ResponseUsage.total_tokens": "input_tokens + output_tokens",
    "openai.CreateEmbeddingResponse.usage.total_tokens": "equal to prompt_tokens (embeddings have no output)",
    "openai.CompletionUsage.prompt_tokens_details.text_tokens":
        "modality breakdown of prompt_tokens, priced inside it at the input rate",
    "openai.CompletionUsage.prompt_tokens_details.image_tokens":
        "modality breakdown of prompt_tokens: chat models bill image inputs as input tokens at the input rate",
    "openai.CompletionUsage.completion_tokens_details.text_tokens":
        "modality breakdown of completion_tokens, priced inside it",
    "openai.CompletionUsage.completion_tokens_details.accepted_prediction_tokens":
        "Predicted Outputs: part of completion_tokens, priced there",
    "openai.CompletionUsage.completion_tokens_details.rejected_prediction_tokens":
        "Predicted Outputs: 'still counted in the total completion tokens for purposes of billing' (SDK "
        "docstring), so priced inside completion_tokens",
    "openai.responses.Response.tool_usage.image_gen.total_tokens": "image_gen.input_tokens + output_tokens",
    # informational
    **{f"{r}.service_tier":
       "which capacity served the request: 'priority' is paid through the Priority Tier commitment, not per "
       "request, and 'batch' is only reachable through the Message Batches API, which Tollgate does not proxy"
       for r in _A_USAGE},
    # usage.iterations: `message` and `fallback_message` entries are already summed in the top level
    **{f"{r}.iterations[{t}].{f}":
       "a sampling iteration the top-level usage fields already sum (BetaUsage.iterations docstring; a "
       "fallback_message entry takes the place of the serving iteration's message entry): adding it again "
       "would double-charge" for r in _A_BETA for t in ("message", "fallback_message") for f in _A_ITER_TOKENS},
    **{f"{r}.fallback_credit.status[not_applied].{f}":
       "why a fallback-credit reprice was not applied: nothing is discounted, the usage bills as reported"
       for r in _A_BETA for f in ("reason", "remove_to_redeem")},
    # Responses output items that cost nothing by themselves (their tokens are in usage)
    f"{_OI}[message]": "its tokens are in usage.output_tokens",
    f"{_OI}[reasoning]": "its tokens are in usage.output_tokens (output_tokens_details.reasoning_tokens)",
    f"{_OI}[compaction]": "the compacted context is billed as tokens, in usage",
    f"{_OI}[additional_tools]": "tool definitions: billed as input tokens, in usage",
    **{f"{_OI}[{t}]": "a client-side tool: the call is output tokens, its result input tokens of the next request"
       for t in ("function_call", "function_call_output", "custom_tool_call", "custom_tool_call_output",
                 "computer_call", "computer_call_output", "local_shell_call", "local_shell_call_output",
                 "apply_patch_call", "apply_patch_call_output", "shell_call_output")},
    f"{_OI}[tool_search_output]": "the tool definitions a tool search loaded: billed as input tokens, in usage",
    **{f"{_OI}[{t}]": "remote MCP server: no OpenAI per-call fee, tool lists and results are billed as tokens"
       for t in ("mcp_call", "mcp_list_tools", "mcp_approval_request", "mcp_approval_response")},
    f"{_OI}[program_output]": "the result of a program item: billed as tokens, in usage",
    # fields of the per-call items: what the call did, not what it costs
    **{f"{_OI}[web_search_call].{f}": "describes the call; billable searches are counted by "
       "Response.tool_usage.web_search.num_requests" for f in (
           "id", "status", "action[search].query", "action[search].queries", "action[search].sources.type",
           "action[search].sources.url")},
    **{f"{_OI}[web_search_call].{f}": "a page action, not a billable search ('actions such as opening a page "
       "are excluded', Response.tool_usage docstring)" for f in (
           "action[open_page].url", "action[find_in_page].url", "action[find_in_page].pattern")},
    **{f"{_OI}[file_search_call].{f}": "describes the call (one call per item, whatever its queries)"
       for f in ("id", "status", "queries")},
    **{f"{_OI}[file_search_call].results.{f}": "retrieved chunks: billed as input tokens, in usage"
       for f in ("attributes", "file_id", "filename", "score", "text")},
    **{f"{_OI}[code_interpreter_call].{f}": "describes the call; the container session is what is billed"
       for f in ("id", "status", "code", "outputs[logs].logs", "outputs[image].url")},
    **{f"{_OI}[image_generation_call].{f}": "describes the image; its cost is in Response.tool_usage.image_gen"
       for f in ("id", "status", "action", "background", "output_format", "result", "revised_prompt",
                 "error.code", "error.message", "error.param", "error.type", "error.moderation_details.categories",
                 "error.moderation_details.moderation_stage")},
    f"{_OI}[tool_search_call]":
        "no fee: OpenAI's tool search guide (developers.openai.com/api/docs/guides/tools-tool-search, read "
        "2026-12-02) describes its cost as tokens only (the loaded definitions are input tokens, in usage), and the "
        "pricing page's built-in tools list no tool search fee; a client-executed search runs on the client",
    f"{_OI}[program]":
        "no fee: programmatic tool calling runs the model's JavaScript in an isolated V8 runtime, not a billed "
        "container (developers.openai.com/api/docs/guides/tools-programmatic-tool-calling, read 2026-12-02); the code "
        "is output tokens and the tools it calls bill as themselves",
    f"{_OI}[image_generation_call].svg_usage.total_tokens": "svg_usage.input_tokens + output_tokens",
}

NOT_YET_PRICED: dict[str, str] = {}
"""Empty: every billed field is priced (issue 10). A field an SDK update adds that is billed but
not priced yet goes here, naming its issue item, until its parser lands."""

