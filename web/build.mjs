// Build the demo into ../rtws/static/ (index.html, app.js, style.css), which the
// server serves at GET /. Run `npm run build`; commit the output.
//
//   node build.mjs             one minified build
//   node build.mjs --watch     rebuild on change (unminified)
//   node build.mjs --out DIR   build elsewhere (tests compare it with the committed output)

import { copyFile, mkdir, readdir, rm } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const argv = process.argv.slice(2);
const outAt = argv.indexOf("--out");
const out = outAt >= 0 ? resolve(argv[outAt + 1]) : join(here, "..", "rtws", "static");
const watch = argv.includes("--watch");

// The output folder holds only what this script writes: start from empty.
await mkdir(out, { recursive: true });
for (const name of await readdir(out)) await rm(join(out, name), { recursive: true });

const common = {
  bundle: true,
  minify: !watch,
  legalComments: "eof",
  logLevel: outAt >= 0 ? "warning" : "info",
  target: ["es2020"],
};
const builds = [
  {
    ...common,
    entryPoints: [join(here, "src", "main.js")],
    outfile: join(out, "app.js"),
    format: "iife",
    banner: { js: "/* rtws chat demo (MIT), built from web/ by `npm run build`; bundles @msgpack/msgpack (ISC). */" },
  },
  { ...common, entryPoints: [join(here, "style.css")], outfile: join(out, "style.css") },
];

await copyFile(join(here, "index.html"), join(out, "index.html"));
if (watch) {
  for (const opts of builds) await (await esbuild.context(opts)).watch();
} else {
  await Promise.all(builds.map((opts) => esbuild.build(opts)));
}
