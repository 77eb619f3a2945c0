-- wrk script: POST the file named by BENCH_BODY_FILE as JSON; count answers other than 202.
-- Top-level code runs once in every wrk thread's Lua state.
local file = assert(io.open(assert(os.getenv("BENCH_BODY_FILE")), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
-- BENCH_HEADERS: extra "Name: value" lines (a signature, a bearer token).
for line in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^\n]+") do
   local name, value = string.match(line, "^([^:]+):%s*(.*)$")
   wrk.headers[name] = value
end

non202 = 0
local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function response(status, headers, body)
   if status ~= 202 then
      non202 = non202 + 1
   end
end

-- One machine-readable line for run.py; latencies in microseconds.
function done(summary, latency, requests)
   local non202_total = 0
   for _, thread in ipairs(threads) do
      non202_total = non202_total + thread:get("non202")
   end
   local e = summary.errors
   io.write(string.format(
      "BENCH {\"requests\": %d, \"duration_us\": %d, \"non_202\": %d, \"socket_errors\": %d, "
         .. "\"p50_us\": %d, \"p99_us\": %d, \"p999_us\": %d, \"max_us\": %d}\n",
      summary.requests, summary.duration, non202_total,
      e.connect + e.read + e.write + e.timeout,
      latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max
   ))
end
