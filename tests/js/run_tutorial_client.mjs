// Drives the tutorial's JavaScript client (tutorial_client.mjs, unchanged) against a real node:
// the tutorial's own usage, with the node's URL and client key from the environment.
// Prints one JSON line: {"submitted": <submit answer>, "result": <the job once it ended>}.
import { CoordinatorClient } from './tutorial_client.mjs';

const baseUrl = process.env.AITBC_URL;
const apiKey = process.env.AITBC_API_KEY;
if (!baseUrl || !apiKey) {
  console.error('set AITBC_URL and AITBC_API_KEY');
  process.exit(2);
}
const timeoutMs = Number(process.env.AITBC_WAIT_MS || 60000);

const client = new CoordinatorClient(baseUrl, apiKey);
const job = await client.submitJob('Hello!');
const result = await client.waitForJob(job.job_id, timeoutMs);
console.log(JSON.stringify({ submitted: job, result }));
