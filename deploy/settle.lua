-- lua.settle(ms): hold the response (and so the replica's slot in HAProxy's "maxconn 1") for ms milliseconds.
-- coglet answers a prediction, then frees its slot in a background task: a request sent the moment after the
-- answer can get 409 "At capacity" (about 1 in 20 on a loaded 2-core machine). HAProxy's retry-on takes no 409
-- (configuration.txt, "retry-on": 401 403 404 408 425 500-504 only), so the proxy waits instead.
-- core.msleep yields (HAProxy lua.txt), so other requests go on meanwhile.
core.register_action("settle", { "http-res" }, function(txn, ms)
    core.msleep(tonumber(ms))
end, 1)
