// Prints the X-Hub-Signature-256 value GitHub would send: `node sign-github.mjs <secret> < body`.
// The signing is @octokit/webhooks' own, so tests/test_providers.py checks the cloud against
// GitHub's official library rather than against a re-implementation of it.
import { Webhooks } from "@octokit/webhooks";

const secret = process.argv[2];
if (!secret) {
  console.error("usage: node sign-github.mjs <secret> < body");
  process.exit(2);
}
const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
// sign() takes the payload as a string and signs its UTF-8 bytes: the body must be UTF-8.
const body = Buffer.concat(chunks).toString("utf8");
console.log(await new Webhooks({ secret }).sign(body));
