"""RayScorer, the class Ray Data builds in each worker, called directly: no Ray needed."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from training.runtime.classifier import Classifier
from training.runtime.options import ClassifierOptions
from training.scoring.ray_data import RayScorer
from training.scoring.records import result_record


def test_the_scorer_loads_and_scores_on_one_thread_of_its_own_whatever_thread_calls_it(tiny_checkpoint, monkeypatch):
    # Ray Data builds the scorer on one thread and calls it on another; torch's thread pool belongs to the thread
    # that runs the model, so every model call must stay on one
    options = ClassifierOptions(device="cpu")
    expected = [result_record(p) for p in Classifier.load(str(tiny_checkpoint), options).classify(["win", "see you"])]
    model_threads = []
    load, classify = Classifier.load, Classifier.classify

    def recorded_load(cls, path, options):
        model_threads.append(threading.current_thread())
        return load(path, options)

    def recorded_classify(self, texts):
        model_threads.append(threading.current_thread())
        return classify(self, texts)

    monkeypatch.setattr(Classifier, "load", classmethod(recorded_load))
    monkeypatch.setattr(Classifier, "classify", recorded_classify)
    scorer = RayScorer(str(tiny_checkpoint), options)
    batch = {"id": np.array([0, 1, 2]), "text": np.array(["win", " ", "see you"], dtype=object)}
    with ThreadPoolExecutor(max_workers=1) as other:
        answers = [scorer(batch), other.submit(scorer, batch).result()]
    assert len(model_threads) == 3 and len(set(model_threads)) == 1
    assert model_threads[0] is not threading.main_thread()
    for answer in answers:
        assert answer["id"].tolist() == [0, 2]  # the blank text's row dropped
        assert answer["label"].tolist() == [r["label"] for r in expected]
        assert answer["probability_spam"].tolist() == [r["probability_spam"] for r in expected]
