"""The layer between the socket and the routes: each request's arrival deadline (protocol), body limits
(body_limit), request ids and log lines (request_log) and request counts (request_count)."""
