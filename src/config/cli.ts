/**
 * The command line and the environment, read through the one option declaration
 * (src/config/options.ts). A bad option or value is a ConfigError: one line, exit 2.
 */
import { parseArgs } from "node:util";
import { ConfigError } from "../errors.js";
import { OPTIONS, resolveSpeculation, type ServerOptions } from "./options.js";

export function helpText(): string {
  const lines = [
    "Usage: npm start -- [options]",
    "",
    "Spindle: an OpenAI-compatible LLM server over llama.cpp.",
    "",
    "Options (each also settable by the environment variable shown; the command line wins):",
  ];
  for (const o of OPTIONS) {
    const flag = `  --${o.flag}${o.arg ? ` ${o.arg}` : ""}`;
    const help = `${o.help} (default: ${o.defaultText})`.replaceAll("`", "").replaceAll("**", "");
    lines.push(`${flag.padEnd(44)}${help} [${o.env}]`);
  }
  lines.push(`${"  --help".padEnd(44)}print this help`);
  return lines.join("\n");
}

export type ParseResult = { kind: "help" } | { kind: "run"; options: ServerOptions };

export function parseCommandLine(argv: string[], env: NodeJS.ProcessEnv = process.env): ParseResult {
  const defs: Record<string, { type: "string" | "boolean"; multiple?: boolean }> = { help: { type: "boolean" } };
  for (const o of OPTIONS) defs[o.flag] = o.boolean ? { type: "boolean" } : { type: "string", multiple: o.multiple === true };
  let values: Record<string, string | boolean | (string | boolean)[] | undefined>;
  try {
    ({ values } = parseArgs({ args: argv, options: defs, strict: true, allowPositionals: false }));
  } catch (err) {
    // node's messages are one line and name the option; drop its internal code prefix.
    throw new ConfigError((err as Error).message.replace(/^TypeError \[[A-Z_]+\]: /, ""));
  }
  if (values.help === true) return { kind: "help" };

  const out: Record<string, unknown> = {};
  let configExplicit = false;
  for (const o of OPTIONS) {
    const given = values[o.flag];
    let raw: string[] | undefined;
    if (given !== undefined) {
      // The command line wins over the environment.
      raw = (Array.isArray(given) ? given : [given]).map(String);
    } else {
      const fromEnv = env[o.env];
      if (fromEnv !== undefined && fromEnv.trim() !== "") {
        raw = o.multiple ? fromEnv.split(",").map((s) => s.trim()).filter((s) => s !== "") : [fromEnv];
      }
    }
    out[o.field] = raw === undefined ? o.fallback() : o.read(raw);
    if (o.field === "configFile") configExplicit = raw !== undefined;
  }
  const options = out as unknown as ServerOptions;
  return { kind: "run", options: { ...options, speculative: resolveSpeculation(options), configExplicit } };
}
