"""Learn and apply correlation-based filter pruning (FCP, Play and Prune, COP) with real filter surgery, as fastai callbacks

Modules:

- `corrprune_edu.admm`: Weight pruning as constrained optimisation (Ye et al. 2018): ADMM-regularised training, hard pruning and masked retraining, and the progressive schedule that reaches high rates through partial prunings, inside `learn.fit`
- `corrprune_edu.channels`: Which channels are coupled to which layers: run the model once, follow every channel through every operation, and group the channels that can only be pruned together
- `corrprune_edu.checkpoint`: Prune a fastai `Learner`'s model in the middle of `fit` without losing the optimiser's hyper-parameters, state or the user's hooks; checkpoint and restore a Learner; save and load pruned models, also through `learn.save` / `learn.load`
- `corrprune_edu.checks`: Feedback that teaches: every check names the task, the input it tried, what it expected and what came back, and says what is probably wrong
- `corrprune_edu.cop`: Customised pruning: remove the channels the next layer reads alike, weighted by what their layers cost in parameters or FLOPs, globally and one filter at a time (Wang et al., IJCAI 2019)
- `corrprune_edu.core`: Argument checks, seeding, threads, the cache folder, the tie rule, the finiteness check: the helpers every other module leans on
- `corrprune_edu.correlation`: How alike two filters are: Pearson and cosine similarity of their weights, how the next layer reads them (COP), and how their activations move together
- `corrprune_edu.course`: Hand out and grade the assignments with nbgrader's own commands: set up a course directory, release student versions, autograde submissions and write feedback
- `corrprune_edu.criteria`: Magnitude (L1-norm) and random filter selection: the baselines every correlation method must beat, as plans
- `corrprune_edu.data`: Real MNIST and CIFAR-10 as fastai `DataLoaders`: stratified seeded subsets, a validation split carved from the training set, and a small MNIST subset shipped inside the package
- `corrprune_edu.demo`: What `make demo` (the `corrprune-demo` command) runs: train LeNet-5 on the MNIST subset shipped with the package, report its costs, prune it with FCP and compare
- `corrprune_edu.distributed`: Prune inside fastai's distributed training: every process makes the same decision, surgery re-wraps the model in a new DistributedDataParallel, and rank 0 saves
- `corrprune_edu.fcp`: Pick the most correlated filter pairs, train them to be even more correlated, drop one of each pair, fine-tune, repeat (Singh et al., WACV 2020)
- `corrprune_edu.flops`: MACs, parameters and measured latency, per layer and in total
- `corrprune_edu.models`: The networks the pruning papers use: Caffe LeNet-5, VGG-16 for CIFAR and the CIFAR ResNets, randomly initialised
- `corrprune_edu.pairs`: The most redundant filter pairs: greedy disjoint matching on |correlation|, per layer or across layers, and which filter of a pair goes
- `corrprune_edu.play_and_prune`: Give an error tolerance, get the smallest model within it: adaptive filter pruning (AFP) shrinks the network while a pruning-rate controller (PRC) protects its accuracy, inside `learn.fit`
- `corrprune_edu.results`: One file format for every benchmark, so tables and plots come from the same files
- `corrprune_edu.sparse`: Weight masks as a first-class object: build them from scores, apply them, keep them applied while a fastai `Learner` trains, count what a sparse model really costs, and hand fully-masked filters to surgery
- `corrprune_edu.surgery`: Remove channels from a real network, exactly: check a plan, cut the planned channels out of every tensor they index (or mask them), and fold a channel into its twin
- `corrprune_edu.train`: A fastai `Learner` factory with good defaults, accuracy on any split, and a cache of trained baselines
- `corrprune_edu.viz`: Figures the tutorials share: where the cost of a network sits, and what its filters look like"""

__version__ = "0.1.0"

import warnings as _warnings
# fastai's import calls torch.jit.script, which torch >= 2.10 flags as deprecated; the warning is not ours to act on.
_warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
