"""The classifiers that train can fit on cached features, and their parameters.

:data:`CLASSIFIERS` is the one table of classifier names, their parameters,
defaults and help text; the command line builds its options from it.

Every model has the same small interface:

``fit(features, labels, n_classes, rounds=None) -> dict``
    Fit on integer labels in ``range(n_classes)`` and return facts about the
    fit for the log and the bundle (iterations, boosting rounds), with a
    ``warning`` message if the fit stopped at its iteration limit. Models
    return warnings instead of logging them because cross-validation fits
    them in worker processes.
``predict_proba(features) -> ndarray of float64, shape (n, n_classes)``
    Rows sum to 1, columns in label order, also for classes absent from
    the training data (probability 0 for logreg, small for LightGBM).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings

import numpy as np

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One tunable parameter of a classifier.

    Attributes
    ----------
    name : str
        Key in the parameter dict; the command-line option is ``--`` plus
        the name with dashes for underscores.
    kind : type
        ``int`` or ``float``.
    default : int or float
    minimum, maximum : int or float, or None
        Inclusive bounds, checked before any fitting.
    help : str
    """

    name: str
    kind: type
    default: int | float
    help: str
    minimum: int | float | None = None
    maximum: int | float | None = None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


# The defaults were chosen for low log loss on 1280-d ImageNet embeddings
# (efficientnet_lite0) of 2,400 dog photos of 120 breeds. C and tol were
# compared by 5-fold CV log loss, the LightGBM settings on one 80/20 split.
# docs/classifier-results.md lists the resulting CV numbers.
LOGREG_PARAMETERS = (
    Parameter("C", float, 0.1, "inverse L2 regularization strength of logreg", minimum=1e-9),
    Parameter("max_iter", int, 500, "maximum L-BFGS iterations of logreg", minimum=1),
    Parameter(
        "tol",
        float,
        1e-3,
        "L-BFGS stopping tolerance of logreg; looser stops sooner, which also regularizes",
        minimum=0.0,
    ),
)

# lambda_l2 > 0 is needed: a leaf with few images of a class has a tiny
# hessian sum, and without L2 its value explodes. On the embeddings above,
# lambda_l2=0 made the training log loss climb from 2.5 to about 30 within
# 10 rounds.
LIGHTGBM_PARAMETERS = (
    Parameter("learning_rate", float, 0.2, "LightGBM shrinkage per boosting round", minimum=1e-6, maximum=1.0),
    Parameter("num_leaves", int, 4, "leaves per LightGBM tree", minimum=2),
    Parameter(
        "pca_components",
        int,
        64,
        "dimensions kept by the whitened PCA in front of LightGBM; 0 uses the standardized features",
        minimum=0,
    ),
    Parameter("max_bin", int, 63, "histogram bins per feature in LightGBM", minimum=2),
    Parameter("feature_fraction", float, 0.5, "fraction of features each LightGBM tree sees", minimum=1e-6, maximum=1.0),
    Parameter(
        "bagging_fraction",
        float,
        1.0,
        "fraction of rows each LightGBM round samples (1.0 turns bagging off)",
        minimum=1e-6,
        maximum=1.0,
    ),
    Parameter("min_data_in_leaf", int, 20, "minimum images in a LightGBM leaf", minimum=1),
    Parameter("lambda_l2", float, 5.0, "L2 regularization of LightGBM leaf values", minimum=0.0),
    Parameter(
        "early_stopping_rounds",
        int,
        20,
        "rounds without improvement on the validation slice before LightGBM stops",
        minimum=1,
    ),
    Parameter("max_rounds", int, 3000, "upper bound on LightGBM boosting rounds", minimum=1),
    Parameter(
        "valid_fraction",
        float,
        0.1,
        "share of each fold's training part held out for LightGBM early stopping",
        minimum=0.01,
        maximum=0.5,
    ),
)

#: Classifier name to its parameters.
CLASSIFIERS = {
    "logreg": LOGREG_PARAMETERS,
    "lightgbm": LIGHTGBM_PARAMETERS,
}

DEFAULT_CLASSIFIER = "logreg"


def all_parameters() -> dict[str, tuple[str, Parameter]]:
    """Return every parameter name mapped to (classifier, parameter)."""
    return {
        parameter.name: (classifier, parameter)
        for classifier, parameters in CLASSIFIERS.items()
        for parameter in parameters
    }


def resolve_params(classifier: str, overrides: dict) -> dict:
    """Return the classifier's defaults updated with ``overrides``, checked.

    Raises
    ------
    PipelineError
        If the classifier is unknown, a parameter belongs to another
        classifier, or a value is out of range.
    """
    if classifier not in CLASSIFIERS:
        raise PipelineError(
            f"Unknown classifier {classifier!r}; choose one of: {', '.join(CLASSIFIERS)}."
        )
    parameters = {parameter.name: parameter for parameter in CLASSIFIERS[classifier]}
    owners = all_parameters()
    params = {name: parameter.default for name, parameter in parameters.items()}
    for name, value in overrides.items():
        if name not in parameters:
            owner = owners[name][0] if name in owners else None
            option = owners[name][1].option if name in owners else name
            where = f"applies to {owner} only" if owner else "is not a classifier parameter"
            raise PipelineError(f"{option} {where}; got it with --classifier {classifier}.")
        parameter = parameters[name]
        value = parameter.kind(value)
        if not math.isfinite(value):
            raise PipelineError(f"{parameter.option} must be a finite number; got {value}.")
        if parameter.minimum is not None and value < parameter.minimum:
            raise PipelineError(f"{parameter.option} must be at least {parameter.minimum}; got {value}.")
        if parameter.maximum is not None and value > parameter.maximum:
            raise PipelineError(f"{parameter.option} must be at most {parameter.maximum}; got {value}.")
        params[name] = value
    return params


def build_classifier(classifier: str, params: dict, seed: int = 0):
    """Return an unfitted model of ``classifier`` with resolved ``params``."""
    if classifier == "logreg":
        return LogisticRegressionModel(params, seed=seed)
    if classifier == "lightgbm":
        return LightGBMModel(params, seed=seed)
    raise PipelineError(f"Unknown classifier {classifier!r}; choose one of: {', '.join(CLASSIFIERS)}.")


def final_rounds(classifier: str, fold_infos: list[dict]) -> int | None:
    """Return the boosting rounds for the model fitted on all data, or None.

    For LightGBM this is the mean of the folds' best rounds, because the
    final model has no held-out slice to stop on.
    """
    if classifier != "lightgbm":
        return None
    return max(1, int(round(float(np.mean([info["rounds"] for info in fold_infos])))))


def _normalise_rows(probabilities: np.ndarray) -> np.ndarray:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


class LogisticRegressionModel:
    """Standardized features and multinomial logistic regression (L-BFGS)."""

    def __init__(self, params: dict, seed: int = 0):
        self.params = dict(params)
        self.seed = seed
        self.pipeline = None
        self.classes_ = None
        self.n_classes = None

    def fit(self, features: np.ndarray, labels: np.ndarray, n_classes: int, rounds: int | None = None) -> dict:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        # With more than two classes and the default lbfgs solver,
        # scikit-learn 1.9 fits the multinomial model. The removed
        # multi_class argument and the deprecated penalty argument are
        # left out on purpose.
        self.pipeline = make_pipeline(
            StandardScaler(),
            LogisticRegression(
                C=self.params["C"],
                max_iter=self.params["max_iter"],
                tol=self.params["tol"],
                random_state=self.seed,
            ),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            self.pipeline.fit(features, labels)
        self.classes_ = self.pipeline[-1].classes_
        self.n_classes = n_classes
        info = {"iterations": int(np.max(self.pipeline[-1].n_iter_))}
        if any(issubclass(warning.category, ConvergenceWarning) for warning in caught):
            info["warning"] = (
                f"logreg stopped at max_iter={self.params['max_iter']} before reaching "
                f"tol={self.params['tol']:g}; raise --max-iter or --tol, or lower --C"
            )
        return info

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        partial = self.pipeline.predict_proba(features)
        probabilities = np.zeros((len(features), self.n_classes), dtype=np.float64)
        probabilities[:, self.classes_] = partial
        return _normalise_rows(probabilities)


class LightGBMModel:
    """Standardization, whitened PCA and multiclass gradient boosting.

    Boosting on all 1280 or more embedding columns is slow because
    LightGBM grows one tree per class per round. A whitened PCA to
    ``pca_components`` dimensions makes each round cheap and, on
    embeddings, loses little log loss.

    Each model uses one thread; train gets parallelism by fitting folds in
    parallel processes. LightGBM's OpenMP threads synchronize after every
    tree, 120 times a round here, and with another busy process on a
    2-core machine two threads ran 50 rounds in 244 s against 5.7 s for
    one thread (LightGBM 4.7.0).
    """

    def __init__(self, params: dict, seed: int = 0):
        self.params = dict(params)
        self.seed = seed
        self.scaler = None
        self.pca = None
        self.booster = None
        self.n_classes = None

    def _booster_params(self) -> dict:
        p = self.params
        params = {
            "objective": "multiclass",
            "num_class": self.n_classes,
            "learning_rate": p["learning_rate"],
            "num_leaves": p["num_leaves"],
            "max_bin": p["max_bin"],
            "feature_fraction": p["feature_fraction"],
            "min_data_in_leaf": p["min_data_in_leaf"],
            "lambda_l2": p["lambda_l2"],
            "num_threads": 1,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "verbosity": -1,
        }
        if p["bagging_fraction"] < 1.0:
            params["bagging_fraction"] = p["bagging_fraction"]
            params["bagging_freq"] = 1
        return params

    def _fit_transform(self, features: np.ndarray) -> np.ndarray:
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        self.scaler = StandardScaler().fit(features)
        scaled = self.scaler.transform(features)
        components = self.params["pca_components"]
        self.pca = None
        if components:
            components = min(components, scaled.shape[0], scaled.shape[1])
            self.pca = PCA(n_components=components, whiten=True, random_state=self.seed).fit(scaled)
            scaled = self.pca.transform(scaled)
        return np.ascontiguousarray(scaled, dtype=np.float32)

    def _transform(self, features: np.ndarray) -> np.ndarray:
        scaled = self.scaler.transform(features)
        if self.pca is not None:
            scaled = self.pca.transform(scaled)
        return np.ascontiguousarray(scaled, dtype=np.float32)

    def fit(self, features: np.ndarray, labels: np.ndarray, n_classes: int, rounds: int | None = None) -> dict:
        """Fit with early stopping on a held-out slice, or for exactly ``rounds`` rounds.

        Without ``rounds``, a stratified ``valid_fraction`` of the given
        rows is held out, and boosting stops once their log loss has not
        improved for ``early_stopping_rounds`` rounds. The model keeps the
        best round. The scaler and PCA are fitted on the remaining rows.
        """
        import lightgbm

        self.n_classes = n_classes
        params = self._booster_params()
        started = time.perf_counter()

        if rounds is not None:
            dataset = lightgbm.Dataset(self._fit_transform(features), labels, params={"max_bin": params["max_bin"]})
            self.booster = lightgbm.train(params, dataset, num_boost_round=rounds)
            return {"rounds": int(rounds), "seconds": time.perf_counter() - started}

        fit_rows, valid_rows = _split_validation(labels, self.params["valid_fraction"], self.seed)
        train_set = lightgbm.Dataset(
            self._fit_transform(features[fit_rows]), labels[fit_rows], params={"max_bin": params["max_bin"]}
        )
        valid_set = lightgbm.Dataset(self._transform(features[valid_rows]), labels[valid_rows], reference=train_set)
        self.booster = lightgbm.train(
            params,
            train_set,
            num_boost_round=self.params["max_rounds"],
            valid_sets=[valid_set],
            valid_names=["early_stopping"],
            callbacks=[lightgbm.early_stopping(self.params["early_stopping_rounds"], verbose=False)],
        )
        best = int(self.booster.best_iteration) or self.booster.current_iteration()
        info = {
            "rounds": best,
            "seconds": time.perf_counter() - started,
            "early_stopping_log_loss": float(self.booster.best_score["early_stopping"]["multi_logloss"]),
        }
        if best <= 1 and self.params["max_rounds"] > 1:
            # With fewer rows per leaf than min_data_in_leaf no tree can split,
            # and the model only predicts the class frequencies.
            info["warning"] = (
                f"LightGBM stopped after {best} round, so its trees have hardly any splits; with "
                f"{len(fit_rows)} training rows lower --min-data-in-leaf (now "
                f"{self.params['min_data_in_leaf']})"
            )
        elif best >= self.params["max_rounds"]:
            info["warning"] = (
                f"LightGBM was still improving at max_rounds={self.params['max_rounds']}; "
                f"raise --max-rounds or --learning-rate"
            )
        return info

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        best = self.booster.best_iteration or None
        return _normalise_rows(self.booster.predict(self._transform(features), num_iteration=best))


def _split_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into a fit part and a stratified validation slice.

    The slice has at least one row per class where every class has two or
    more rows; otherwise it is drawn without stratification.
    """
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(labels))
    counts = np.bincount(labels)
    present = int((counts > 0).sum())
    n_valid = max(int(round(fraction * len(labels))), present)
    if counts[counts > 0].min() >= 2 and n_valid <= len(labels) - present:
        return train_test_split(rows, test_size=n_valid, stratify=labels, random_state=seed)
    n_valid = max(1, int(round(fraction * len(labels))))
    return train_test_split(rows, test_size=n_valid, random_state=seed)
