/** Which chat template renders a model's prompts: the GGUF's own, a named built-in, or a Jinja file. */
import { readFileSync } from "node:fs";
import { JinjaTemplateChatWrapper, resolveChatWrapper, specializedChatWrapperTypeNames, type ChatWrapper, type LlamaModel } from "node-llama-cpp";
import { firstLine, ModelLoadError } from "./types.js";

export function resolveTemplate(model: LlamaModel, template: string | undefined, id: string): ChatWrapper {
  if (template === undefined) return resolveChatWrapper(model);
  if ((specializedChatWrapperTypeNames as readonly string[]).includes(template)) {
    return resolveChatWrapper(model, { type: template as (typeof specializedChatWrapperTypeNames)[number] });
  }
  let text: string;
  try {
    text = readFileSync(template, "utf8");
  } catch {
    throw new ModelLoadError(
      `model "${id}": chat_template "${template}" is neither a built-in (${specializedChatWrapperTypeNames.join(", ")}) nor a readable Jinja file`,
    );
  }
  try {
    return new JinjaTemplateChatWrapper({ template: text });
  } catch (err) {
    throw new ModelLoadError(`model "${id}": chat_template ${template}: ${firstLine(err)}`);
  }
}
