class CoordinatorClient {
  constructor(baseUrl, apiKey = null) {
    this.baseUrl = baseUrl;
    this.headers = { 'Content-Type': 'application/json' };
    if (apiKey) this.headers['X-Api-Key'] = apiKey;
  }

  async submitJob(prompt, model = 'llama3.2', params = {}) {
    const response = await fetch(`${this.baseUrl}/v1/jobs`, {
      method: 'POST',
      headers: this.headers,
      body: JSON.stringify({ prompt, model, params })
    });
    return response.json();
  }

  async getJob(jobId) {
    const response = await fetch(`${this.baseUrl}/v1/jobs/${jobId}`, {
      headers: this.headers
    });
    return response.json();
  }

  async waitForJob(jobId, timeout = 60000) {
    const start = Date.now();
    while (Date.now() - start < timeout) {
      const job = await this.getJob(jobId);
      if (['completed', 'failed', 'cancelled'].includes(job.status)) {
        return job;
      }
      await new Promise(r => setTimeout(r, 2000));
    }
    throw new Error('Timeout');
  }
}

// Above, byte for byte: the class of the tutorial's "JavaScript Integration" section
// (coordinator-api-tutorial.md); tests/test_js_client.py checks it against the spec.
export { CoordinatorClient };
