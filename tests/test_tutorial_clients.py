"""The tutorial's Python clients, copied unchanged from the Coordinator API tutorial, against a
real node started with `--alias llama3.2=smollm2-135m-instruct` (the clients' default model)."""

from __future__ import annotations

import asyncio

from tests.conftest import GENERATION_WAIT, SMOL, NodeProcess

# --- copied unchanged from the tutorial: "Using httpx" -----------------------------------
import httpx

class CoordinatorClient:
    def __init__(self, base_url: str, api_key: str = None):
        self.base_url = base_url
        self.headers = {}
        if api_key:
            self.headers["X-Api-Key"] = api_key
        self.client = httpx.Client(headers=self.headers, timeout=30.0)
    
    def submit_job(self, prompt: str, model: str = "llama3.2", **params) -> dict:
        response = self.client.post(
            f"{self.base_url}/v1/jobs",
            json={"prompt": prompt, "model": model, "params": params}
        )
        response.raise_for_status()
        return response.json()
    
    def get_job(self, job_id: str) -> dict:
        response = self.client.get(f"{self.base_url}/v1/jobs/{job_id}")
        response.raise_for_status()
        return response.json()
    
    def wait_for_job(self, job_id: str, timeout: int = 60) -> dict:
        import time
        start = time.time()
        while time.time() - start < timeout:
            job = self.get_job(job_id)
            if job["status"] in ["completed", "failed", "cancelled"]:
                return job
            time.sleep(2)
        raise TimeoutError(f"Job {job_id} did not complete in {timeout}s")

# --- copied unchanged from the tutorial: "Async Version" ---------------------------------
import httpx
import asyncio

class AsyncCoordinatorClient:
    def __init__(self, base_url: str, api_key: str = None):
        self.base_url = base_url
        headers = {"X-Api-Key": api_key} if api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=30.0)
    
    async def submit_job(self, prompt: str, model: str = "llama3.2") -> dict:
        response = await self.client.post(
            f"{self.base_url}/v1/jobs",
            json={"prompt": prompt, "model": model}
        )
        response.raise_for_status()
        return response.json()
    
    async def wait_for_job(self, job_id: str, timeout: int = 60) -> dict:
        start = asyncio.get_event_loop().time()
        while asyncio.get_event_loop().time() - start < timeout:
            response = await self.client.get(f"{self.base_url}/v1/jobs/{job_id}")
            job = response.json()
            if job["status"] in ["completed", "failed"]:
                return job
            await asyncio.sleep(2)
        raise TimeoutError()

# --- end of the tutorial's code -----------------------------------------------------------


def test_tutorial_sync_client(node: NodeProcess) -> None:
    client = CoordinatorClient(node.url, node.client_key)
    job = client.submit_job("Hello, world!")
    assert job["status"] == "pending"
    result = client.wait_for_job(job["job_id"], timeout=GENERATION_WAIT)
    assert result["status"] == "completed"
    assert result["result"].strip()
    assert result["model"] == "llama3.2" and result["served_model"] == SMOL
    # the tutorial passes params as keyword arguments
    job = client.submit_job("Hello, world!", max_tokens=8, temperature=0.0)
    done = client.wait_for_job(job["job_id"], timeout=GENERATION_WAIT)
    assert done["usage"]["completion_tokens"] <= 8


def test_tutorial_sync_client_raises_on_errors(node: NodeProcess) -> None:
    client = CoordinatorClient(node.url, "ait_client_not_a_key")
    try:
        client.submit_job("Hello, world!")
    except httpx.HTTPStatusError as e:
        assert e.response.status_code == 401
        assert e.response.json()["error_code"] == "INVALID_API_KEY"
    else:
        raise AssertionError("a bad key was accepted")


def test_tutorial_async_client(node: NodeProcess) -> None:
    async def main() -> dict:
        client = AsyncCoordinatorClient(node.url, node.client_key)
        job = await client.submit_job("Hello, world!")
        return await client.wait_for_job(job["job_id"], timeout=GENERATION_WAIT)

    result = asyncio.run(main())
    assert result["status"] == "completed"
    assert result["result"].strip()
