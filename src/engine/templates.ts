/**
 * Which template renders a model's chats: a built-in wrapper the configuration names, a
 * Jinja file it names, the GGUF's own `tokenizer.chat_template`, or — for a model with
 * none — node-llama-cpp's guess from its name (the load says so: set one).
 */
import { readFileSync } from "node:fs";
import { basename } from "node:path";
import { resolveChatWrapper, specializedChatWrapperTypeNames, type Llama, type LlamaModel, type Token } from "node-llama-cpp";
import { ChatTemplate } from "./chat-template.js";
import { PromptRenderer } from "./prompt-renderer.js";
import { firstLine, ModelLoadError } from "./types.js";

export function resolveRenderer(
  llama: Llama,
  model: LlamaModel,
  template: string | undefined,
  id: string,
  tokenize: (text: string) => Token[],
): { renderer: PromptRenderer; guessed: boolean } {
  const special = { bos: model.tokens.bosString ?? "", eos: model.tokens.eosString ?? "" };
  const jinja = (source: string, name: string) => {
    try {
      return new PromptRenderer(model, tokenize, new ChatTemplate(llama, source, special), name);
    } catch (err) {
      throw new ModelLoadError(`model "${id}": chat_template ${name}: ${firstLine(err)}`);
    }
  };
  if (template === undefined) {
    const own = model.fileInfo.metadata.tokenizer?.chat_template;
    if (typeof own === "string" && own.trim() !== "") return { renderer: jinja(own, "gguf"), guessed: false };
    const wrapper = resolveChatWrapper(model);
    return { renderer: new PromptRenderer(model, tokenize, wrapper, wrapper.wrapperName), guessed: true };
  }
  if ((specializedChatWrapperTypeNames as readonly string[]).includes(template)) {
    const wrapper = resolveChatWrapper(model, { type: template as (typeof specializedChatWrapperTypeNames)[number] });
    return { renderer: new PromptRenderer(model, tokenize, wrapper, template), guessed: false };
  }
  let text: string;
  try {
    text = readFileSync(template, "utf8");
  } catch {
    throw new ModelLoadError(
      `model "${id}": chat_template "${template}" is neither a built-in (${specializedChatWrapperTypeNames.join(", ")}) nor a readable Jinja file`,
    );
  }
  return { renderer: jinja(text, basename(template)), guessed: false };
}
