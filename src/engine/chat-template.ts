/**
 * A model's own chat template (`tokenizer.chat_template`, or a Jinja file), rendered the
 * way llama-server renders it: with llama.cpp's Jinja engine, which node-llama-cpp
 * bundles (`AddonJinjaRenderer`), and Hugging Face's JavaScript port as the fallback for
 * a template that engine cannot take. test/chat-template-corpus.test.ts holds both to
 * Python's jinja2 (Hugging Face's settings) over llama.cpp's template corpus.
 *
 * The context is Hugging Face's apply_chat_template's: messages (with tool_calls and
 * tool results), tools, add_generation_prompt, bos_token, eos_token, and any extra
 * keyword arguments (chat_template_kwargs: enable_thinking, reasoning_effort, …).
 */
import { Template } from "@huggingface/jinja";
import type { Llama } from "node-llama-cpp";
import { firstLine, PromptRenderError } from "./types.js";

export interface TemplateToolCall {
  id: string;
  type: "function";
  /** Arguments as an object: what templates expect (many write `arguments | tojson`). */
  function: { name: string; arguments: unknown };
}

export interface TemplateMessage {
  role: "system" | "user" | "assistant" | "tool";
  content: string;
  name?: string;
  tool_calls?: TemplateToolCall[];
  tool_call_id?: string;
  reasoning_content?: string;
}

export interface ToolDefinition {
  type: "function";
  function: { name: string; description?: string; parameters?: unknown; strict?: boolean };
}

/** How a template's models write tool calls, read from the template itself. */
export type ToolFamily = "hermes" | "mistral" | "llama3" | "json" | "none";

export interface TemplateCapabilities {
  /** The template renders `tools` (else tools are described in a system message of ours). */
  tools: boolean;
  toolFamily: ToolFamily;
  /** The markers of a thinking section, when the template has one. */
  reasoning: { start: string; end: string } | undefined;
}

interface NativeRenderer {
  render(items: Record<string, unknown>): string;
}

export function detectCapabilities(source: string): TemplateCapabilities {
  const tools = /\btools\b/.test(source);
  let toolFamily: ToolFamily = "none";
  if (source.includes("<tool_call>")) toolFamily = "hermes";
  else if (source.includes("[TOOL_CALLS]")) toolFamily = "mistral";
  else if (source.includes("<|python_tag|>") || (source.includes("<|start_header_id|>") && tools)) toolFamily = "llama3";
  else if (tools) toolFamily = "json";
  const reasoning = source.includes("<think>") ? { start: "<think>", end: "</think>" } : undefined;
  return { tools, toolFamily, reasoning };
}

export class ChatTemplate {
  readonly capabilities: TemplateCapabilities;
  private native: NativeRenderer | undefined;
  private js: Template | undefined;
  private readonly nativeError: string | undefined;

  constructor(
    llama: Llama,
    readonly source: string,
    private readonly special: { bos: string; eos: string },
  ) {
    this.capabilities = detectCapabilities(source);
    const bindings = (llama as unknown as { _bindings?: { AddonJinjaRenderer?: new (t: string) => NativeRenderer } })._bindings;
    try {
      if (!bindings?.AddonJinjaRenderer) throw new Error("this build has no native Jinja renderer");
      this.native = new bindings.AddonJinjaRenderer(source);
    } catch (err) {
      this.nativeError = firstLine(err);
    }
    if (!this.native) {
      try {
        this.js = new Template(source);
      } catch (err) {
        throw new Error(`the chat template cannot be parsed: ${this.nativeError}; ${firstLine(err)}`);
      }
    }
  }

  /** The prompt text, special tokens written as text (tokenized with special parsing). */
  render(input: { messages: readonly TemplateMessage[]; tools?: readonly ToolDefinition[]; addGenerationPrompt: boolean; kwargs?: Record<string, unknown> }): string {
    const items: Record<string, unknown> = {
      ...input.kwargs,
      messages: input.messages,
      add_generation_prompt: input.addGenerationPrompt,
      bos_token: this.special.bos,
      eos_token: this.special.eos,
    };
    if (input.tools && input.tools.length > 0) items.tools = input.tools;
    if (this.native) {
      try {
        return this.native.render(items);
      } catch (err) {
        // raise_exception and type errors from the template itself are the caller's problem.
        const message = firstLine(err);
        if (!this.js) {
          try {
            this.js = new Template(this.source);
          } catch {
            throw new PromptRenderError(`the chat template rejected these messages: ${message}`);
          }
        }
        try {
          return this.js.render(items);
        } catch {
          throw new PromptRenderError(`the chat template rejected these messages: ${message}`);
        }
      }
    }
    try {
      return this.js!.render(items);
    } catch (err) {
      throw new PromptRenderError(`the chat template rejected these messages: ${firstLine(err)}`);
    }
  }
}
