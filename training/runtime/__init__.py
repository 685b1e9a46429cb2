"""What every consumer loads (the server, file scoring, Ray, evaluation, the exports): the model (model), GPT-2's
tokenizer (tokenizer), the checkpoint contract (checkpoint, record), the path from tokens to probabilities and
decisions (inference), which precision runs where (precision, device), how a classifier is loaded and run (options,
classifier) and what counts as a text (text). It never imports fine-tuning, the command line or the server."""
