/**
 * A chat as the model reads it: rendered by the model's own Jinja template (exactly, see
 * chat-template.ts) or by one of node-llama-cpp's built-in wrappers when the models file
 * names one (`general`, `chatML`, …) or the GGUF has no template. Tools a template does
 * not render itself, and tool calls and results in the history, are written in a generic
 * form (a system message describing the tools, `<tool_call>` blocks) that the output
 * parser then reads back.
 */
import type { ChatHistoryItem, ChatWrapper, LlamaModel, Token } from "node-llama-cpp";
import { ChatTemplate, type TemplateCapabilities, type TemplateMessage, type ToolDefinition } from "./chat-template.js";
import { firstLine, PromptRenderError } from "./types.js";

export interface ChatRenderInput {
  messages: readonly TemplateMessage[];
  tools?: readonly ToolDefinition[];
  /** Extra template variables (chat_template_kwargs, reasoning_effort). */
  kwargs?: Record<string, unknown>;
}

export interface RenderedChat {
  /** The prompt text (what `POST /apply-template` answers), without a BOS the tokenizer adds. */
  text: string;
  tokens: Token[];
  /** Plain-text stop triggers of a built-in wrapper; never sent to the client. */
  stopStrings: string[];
  /** The prompt ends inside an opened thinking section: the output starts as reasoning. */
  thinkingOpen: boolean;
  capabilities: TemplateCapabilities;
}

const GENERIC: TemplateCapabilities = { tools: false, toolFamily: "none", reasoning: undefined };

/** Tools a template does not render: described in a system message, called as Hermes-style blocks. */
export function toolsSystemText(tools: readonly ToolDefinition[]): string {
  const list = tools.map((t) => JSON.stringify({ name: t.function.name, description: t.function.description ?? "", parameters: t.function.parameters ?? {} })).join("\n");
  return (
    "You can call the following tools. To call one, reply with exactly\n<tool_call>\n" +
    '{"name": "<tool name>", "arguments": {<the arguments as JSON>}}\n</tool_call>\n' +
    "and nothing else in that reply; you will then get the tool's result.\n\nTools:\n" +
    list
  );
}

/** A tool call or result written as text, for templates and wrappers that have no form of their own. */
function toolCallText(m: TemplateMessage): string {
  const calls = (m.tool_calls ?? []).map((c) => `<tool_call>\n${JSON.stringify({ name: c.function.name, arguments: c.function.arguments })}\n</tool_call>`);
  return [m.content, ...calls].filter((s) => s !== "").join("\n");
}

/** Messages in the generic form: tools in a system message, tool calls and results as text. */
function generic(messages: readonly TemplateMessage[], tools: readonly ToolDefinition[] | undefined): TemplateMessage[] {
  const out: TemplateMessage[] = messages.map((m) => {
    if (m.role === "tool") return { role: "user", content: `<tool_response>\n${m.content}\n</tool_response>` };
    if (m.role === "assistant" && m.tool_calls?.length) return { role: "assistant", content: toolCallText(m) };
    return m;
  });
  if (tools && tools.length > 0) {
    const text = toolsSystemText(tools);
    if (out[0]?.role === "system") out[0] = { ...out[0], content: `${out[0].content}\n\n${text}` };
    else out.unshift({ role: "system", content: text });
  }
  return out;
}

export class PromptRenderer {
  constructor(
    private readonly model: LlamaModel,
    private readonly tokenize: (text: string) => Token[],
    private readonly template: ChatTemplate | ChatWrapper,
    /** Where the template came from: "gguf", a file name, or a built-in wrapper's name. */
    readonly name: string,
  ) {}

  get capabilities(): TemplateCapabilities {
    return this.template instanceof ChatTemplate ? this.template.capabilities : GENERIC;
  }

  render(input: ChatRenderInput): RenderedChat {
    return this.template instanceof ChatTemplate ? this.renderJinja(this.template, input) : this.renderWrapper(this.template, input);
  }

  private renderJinja(t: ChatTemplate, input: ChatRenderInput): RenderedChat {
    const caps = t.capabilities;
    const messages = caps.tools ? input.messages : generic(input.messages, input.tools);
    const tools = caps.tools ? input.tools : undefined;
    const last = messages.at(-1);
    // A trailing assistant message is continued, not closed: render it and cut after its text.
    const continuing = last?.role === "assistant" && !last.tool_calls?.length && last.content.trim() !== "";
    let text = t.render({ messages, tools, addGenerationPrompt: !continuing, kwargs: input.kwargs });
    if (continuing) {
      const at = text.lastIndexOf(last.content.trim());
      if (at !== -1) text = text.slice(0, at + last.content.trim().length);
    }
    // The tokenizer adds BOS where the model wants one; a template that writes it too would double it.
    const bos = this.model.tokens.bosString;
    if (bos && this.model.tokens.shouldPrependBosToken && text.startsWith(bos)) text = text.slice(bos.length);
    const thinkingOpen = caps.reasoning !== undefined && !continuing && text.trimEnd().endsWith(caps.reasoning.start);
    return { text, tokens: this.tokenize(text), stopStrings: [], thinkingOpen, capabilities: caps };
  }

  private renderWrapper(wrapper: ChatWrapper, input: ChatRenderInput): RenderedChat {
    const history: ChatHistoryItem[] = [];
    for (const m of generic(input.messages, input.tools)) {
      if (m.role === "system") history.push({ type: "system", text: m.content });
      else if (m.role === "assistant") history.push({ type: "model", response: [m.content] });
      else history.push({ type: "user", text: m.content });
    }
    if (history.at(-1)?.type !== "model") history.push({ type: "model", response: [] });
    let state;
    try {
      state = wrapper.generateContextState({ chatHistory: history });
    } catch (err) {
      throw new PromptRenderError(`the chat template rejected these messages: ${firstLine(err)}`);
    }
    const stopStrings: string[] = [];
    for (const trigger of state.stopGenerationTriggers) {
      if (trigger.values.length > 0 && trigger.values.every((v) => typeof v === "string")) {
        const s = (trigger.values as string[]).join("");
        if (s !== "") stopStrings.push(s);
      }
    }
    const tokens = state.contextText.tokenize(this.model.tokenizer);
    return { text: this.model.detokenize(tokens, true), tokens, stopStrings, thinkingOpen: false, capabilities: GENERIC };
  }
}
