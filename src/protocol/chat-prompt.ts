/**
 * A chat, from any chat API (OpenAI Chat Completions, Responses, Anthropic Messages),
 * made into a generation for the model that serves it: the messages rendered by its
 * template with the tools, the output constrained (forced tool calls, a schema) and
 * split (reasoning, tool calls), the context fit checked, sampling settled.
 */
import type { TemplateMessage } from "../engine/chat-template.js";
import { PromptRenderError } from "../engine/types.js";
import { ApiError, invalidRequest } from "../errors.js";
import type { PreparedPrompt, PromptModel } from "../service/generation.js";
import { refuseSurelyTooLong, resolveMaxTokens, samplingParams, type SamplingInput } from "../service/sampling.js";
import { planTools, type functionTool, type ToolChoice } from "./openai-tools.js";
import type { z } from "zod";

export interface ChatInput {
  messages: TemplateMessage[];
  tools: ReadonlyArray<z.infer<typeof functionTool>> | null | undefined;
  toolChoice: ToolChoice | null | undefined;
  parallelToolCalls: boolean;
  /** A grammar from the request's structured-output fields. */
  grammar: string | undefined;
  sampling: SamplingInput;
  /** The requested output length and the name of its field (for errors). */
  maxTokens: { value: number | undefined; param: string };
  stop: string[];
  kwargs: Record<string, unknown>;
  logprobs?: number;
  choices?: number;
  minTokens?: number;
  stopTokenIds?: ReadonlySet<number>;
  includeStopString?: boolean;
  /** Names of fields for errors: where the messages and the tools are. */
  params: { messages: string; tools: string; toolChoice: string };
}

export function prepareChat(model: PromptModel, input: ChatInput): PreparedPrompt {
  let chars = 0;
  for (const m of input.messages) chars += m.content.length;
  refuseSurelyTooLong(chars, model, input.params.messages);
  const tools = planTools(input.tools, input.toolChoice, input.parallelToolCalls, model.template, { tools: input.params.tools, choice: input.params.toolChoice });
  if (input.grammar !== undefined && tools.grammar !== undefined) {
    throw invalidRequest("A forced tool call and a response format both constrain the output: send one.", input.params.toolChoice, "invalid_value");
  }
  let rendered;
  try {
    rendered = model.renderChat({ messages: input.messages, tools: tools.tools, kwargs: input.kwargs });
  } catch (err) {
    if (err instanceof PromptRenderError) throw new ApiError("invalid_request", err.message, { param: input.params.messages, code: "invalid_messages" });
    throw err;
  }
  const reasoning = rendered.capabilities.reasoning;
  let grammar = tools.grammar ?? input.grammar;
  // A prompt that opened a thinking section: the model may finish its thoughts before the constrained part.
  if (grammar !== undefined && rendered.thinkingOpen && reasoning) {
    grammar = grammar.replace(/^root ::= /m, `root ::= thinking ${JSON.stringify(reasoning.end)} ws-after-thinking `) + `thinking ::= ( [^<] | "<" [^/] )*\nws-after-thinking ::= [ \\t\\n]*\n`;
  }
  return {
    promptTokens: rendered.tokens,
    maxTokens: resolveMaxTokens(rendered.tokens.length, input.maxTokens.value, model.sampling.max_tokens, model.ctxSize, { prompt: input.params.messages, maxTokens: input.maxTokens.param }),
    fillsContext: input.maxTokens.value == null && model.sampling.max_tokens === undefined,
    stop: [...input.stop, ...rendered.stopStrings],
    sampling: samplingParams(input.sampling, model),
    grammar,
    minTokens: input.minTokens,
    stopTokenIds: input.stopTokenIds,
    includeStopString: input.includeStopString,
    logprobs: input.logprobs,
    choices: input.choices ?? 1,
    output: reasoning || tools.output ? { reasoning: reasoning ? { ...reasoning, open: rendered.thinkingOpen } : undefined, tools: tools.output } : undefined,
  };
}
