"""The default configuration: every field bioflax reads, with its meaning.

Experiment configs import this module and override fields; any field can also be set on
the command line: ``python main.py --config=configs/kp_mnist.py
--config.optimizer.learning_rate=0.1 --workdir=runs/x``.
"""

import dataclasses

import ml_collections

from bioflax import procedures


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # initialises parameters and teacher, picks the validation split, orders data

    config.data = data = ml_collections.ConfigDict()
    # A TFDS image-classification data set, 'mnist', 'fashion_mnist', 'cifar10', 'cifar100'
    # or 'svhn_cropped'; or 'teacher' (teacher-student regression) or 'sinreg'; or 'text'
    # (next-token prediction on the local UTF-8 file data.text_path, for model.name =
    # 'transformer_lm').
    data.dataset = "mnist"
    # TFDS data directory; None: TFDS's default, or $TFDS_DATA_DIR when set.
    data.data_dir = ml_collections.config_dict.placeholder(str)
    data.download = True  # TFDS data sets: let TFDS download one when no prepared copy is found
    data.batch_size = 128  # global training batch, split evenly over all devices
    data.eval_batch_size = 1000  # global evaluation batch (the last one is padded and masked)
    data.val_split = 0.1  # fraction of the training set held out for validation; 0: none
    # Image pixels in [0, 1] become (x - mean) / std, per channel. None: the data set's own
    # statistics (bioflax/experiment/datasets.py DATASETS; MNIST 0.1307 and 0.3081); a
    # number: that value for every channel (0 and 1 keep pixels in [0, 1]).
    data.normalize_mean = ml_collections.config_dict.placeholder(float)
    data.normalize_std = ml_collections.config_dict.placeholder(float)
    data.flatten = True  # images as vectors (N, H*W*C), as MLPs take them; False: (N, H, W, C)
    # Resize images to image_size x image_size (bilinear) before normalising, e.g. 32 for
    # LeNet-5 on MNIST as biotorch does; None: the data set's size. In-memory loading only.
    data.image_size = ml_collections.config_dict.placeholder(int)
    # Training augmentation of images, run in tf.data (needs data.in_memory = False), a pure
    # function of (seed, epoch, example): pad every side by this many black pixels, then crop
    # a random window of the image size (CIFAR's standard: 4); 0: no crop.
    data.random_crop_padding = 0
    data.random_flip = False  # flip each training image horizontally with probability 1/2
    data.input_dim = 10  # teacher task: input dimension (sinreg: 1)
    data.output_dim = 10  # teacher task: output dimension (sinreg: 1)
    data.train_size = 10_000  # teacher and sinreg: number of training examples
    data.test_size = 2_000  # teacher and sinreg: number of test examples
    data.teacher_hidden_layers = ()  # hidden widths of the teacher network
    data.teacher_activation = "identity"  # activation after every teacher layer
    # 'text': the file; its last text_test_fraction is the test split and, before it, the
    # last val_split of the rest the validation split (contiguous tails, not random windows).
    data.text_path = ml_collections.config_dict.placeholder(str)
    data.text_tokens = "bytes"  # 'text': 'bytes' (vocabulary 256) or 'characters' (the file's)
    data.context_length = 64  # 'text': tokens per example (inputs and next-token targets)
    data.text_test_fraction = 0.1  # 'text': the tail of the file held out as the test split
    # 'text': tokens between the starts of consecutive windows; None: context_length (windows
    # that do not overlap).
    data.text_stride = ml_collections.config_dict.placeholder(int)
    data.in_memory = True  # hold the training split on the device (fast path) or use tf.data
    # TFDS data sets: read the splits from their files as training goes, each process its own
    # shard, instead of loading them whole into memory (for data sets larger than memory;
    # needs data.in_memory = False). The validation split is then the last val_split of
    # the training split, not a random one.
    data.streaming = False

    config.model = model = ml_collections.ConfigDict()
    # 'mlp' (BioNeuralNetwork: hidden_layers, activations), or a model of bioflax/zoo.py
    # trained through bioflax.convert: 'lenet5' (32x32x1 input), 'lenet_cifar', 'resnet20',
    # 'resnet32', 'resnet44', 'resnet56', 'resnet110', 'vit_mnist' (a small Vision
    # Transformer, 28x28x1) (these take images: data.flatten=False), or 'transformer_lm' (a
    # causal Transformer language model, for data.dataset = 'text')
    model.name = "mlp"
    # The Flax API the model is written in: 'linen', or 'nnx' (the NNX twins of 'mlp' and
    # 'lenet5' in bioflax/nnx_zoo.py, built initialised from config.seed and converted by
    # bioflax.convert; one seed per run: training.num_seeds = 1)
    model.api = "linen"
    # The learning rule (bioflax/rules.py): 'bp', 'fa', 'kp', 'dfa', 'interpolate_fa_bp',
    # 'usf', 'frsf' or 'brsf'
    model.rule = "bp"
    # Deprecated old name of model.rule: when set, it is used as the rule (with a warning)
    model.mode = ml_collections.config_dict.placeholder(str)
    # Zoo models: Dense/Conv layers kept on backprop, glob patterns of their paths ('fc2')
    model.keep_backprop = ()
    # DFA per block (Launay et al.): glob patterns of module paths (the zoo's Transformer
    # blocks are 'block0', 'block1', ...: ('block*',)) whose outputs receive the projected
    # error, backprop inside; only with model.rule = 'dfa'.
    model.feedback_points = ()
    # transformer_lm: the output projection is the token embedding's transpose (tied) instead
    # of its own Dense layer
    model.tie_embeddings = False
    # vit_mnist: the head reads the class token ('cls') or the mean of the tokens ('mean')
    model.pooling = "cls"
    model.interpolation_factor = 0.5  # λ of interpolate_fa_bp: 1 = FA, 0 = BP
    # dfa, zoo models: B at a conv layer's input, 'dense' ((H·W·C, n_outputs)) or
    # 'shared_kernel' ((kh, kw, C, n_outputs), biotorch's); see bioflax/converter.py
    model.dfa_conv_feedback = "dense"
    # dfa, drtp, zoo models and the NNX MLP: B at an input with positions the output lacks
    # (a ViT's tokens under a classifier, a conv input's rows and columns), one entry per
    # position ('independent') or one B of the features the layer contracts, shared by every
    # position ('shared', Launay et al.'s TinyDFA); see bioflax/rules.py
    model.dfa_position_feedback = "independent"
    # dfa: what B_l projects, 'error' (e) or 'sign' (sign(e), sDFA); drtp projects the target
    model.dfa_signal = "error"
    # Zoo models: the convolution of their Conv layers (bioflax/converter.py CONV_IMPLS):
    # 'xla' (lax.conv_general_dilated, nn.Conv's own), 'banded' (bioflax/conv.py's banded
    # matmuls, equal up to float rounding and faster to train on XLA:CPU) or 'auto'
    # (banded on the CPU backend, xla elsewhere)
    model.conv_impl = "auto"
    model.hidden_layers = (500,)  # widths of the hidden layers
    model.activations = ("relu",)  # one activation name per hidden layer
    # W (bioflax/experiment/initializers.py): 'lecun_normal' (truncated normal, variance
    # 1 / fan_in), 'uniform' (U[-s, s]), 'fan_in_uniform' (U[-s, s] / sqrt(fan_in); s = 1 is
    # PyTorch's nn.Linear default), 'variance_scaling' (truncated normal with variance
    # s / fan_in), 'xavier_uniform' (U[-a, a], a = s·sqrt(6 / (fan_in + fan_out))) or 'zeros'
    model.kernel_init = "lecun_normal"
    # s of 'uniform', 'fan_in_uniform', 'variance_scaling' or 'xavier_uniform'; must stay 1
    # for 'lecun_normal' and 'zeros', which take no scale
    model.kernel_init_scale = 1.0
    # W of the first layer only (same choices and scale); None: kernel_init like the rest.
    model.input_layer_kernel_init = ml_collections.config_dict.placeholder(str)
    model.feedback_init = "lecun_normal"  # B: same choices as kernel_init
    model.feedback_init_scale = 1.0  # B's scale s: same meaning as kernel_init_scale
    # The training loss on the network's outputs; None: the data set's default. MNIST:
    # 'softmax_cross_entropy' (default), 'sigmoid_cross_entropy' (one sigmoid per class,
    # summed binary cross-entropies) or 'sigmoid_squared_error' (½‖σ(z) − onehot‖²);
    # regression data sets: 'mean_squared_error'.
    model.loss = ml_collections.config_dict.placeholder(str)

    config.optimizer = optimizer = ml_collections.ConfigDict()
    # 'sgd' (with momentum), 'rmsprop', 'adam' or 'adamw' (Adam with decoupled decay)
    optimizer.name = "sgd"
    optimizer.learning_rate = 0.05  # the peak rate of the schedule
    optimizer.momentum = 0.9  # sgd only; 0 for plain SGD
    optimizer.nesterov = False  # sgd only: Nesterov's momentum (PyTorch's nesterov=True)
    optimizer.rmsprop_decay = 0.99  # rmsprop only: ν ← decay·ν + (1 − decay)·g²
    # wd * W is added to the gradient of W (and of KP's B) before the optimizer: L2 decay;
    # adamw: subtracted as lr * wd * W after it (decoupled).
    optimizer.weight_decay = 0.0
    # (pattern, learning_rate, weight_decay) per group of parameters trained at their own
    # rate and decay (e.g. (("classifier/*", 1e-2, 3e-3),)); the first matching glob wins.
    optimizer.groups = ()
    # Glob patterns of parameter paths ('head/*'); when set, every parameter matching none
    # stays at its initial value (e.g. the last-layer-only control). (): all train.
    optimizer.trainable = ()
    # 'constant', 'cosine' (decays to 0 over the run), 'multistep' (× decay_factor at
    # each fraction decay_at of the run's steps) or 'linear_cooldown' (constant, then
    # linearly to 0 from the fraction decay_at[0] of the run)
    optimizer.schedule = "constant"
    optimizer.decay_at = (0.5, 0.75)  # multistep: fractions of the run (epoch 50 of 100: 0.5)
    optimizer.decay_factor = 0.1  # multistep: the factor at each of them
    optimizer.warmup_steps = 0  # linear warm-up from 0 before the schedule

    config.training = training = ml_collections.ConfigDict()
    training.epochs = 10  # epochs to train (a run resumed in its workdir counts on)
    training.log_every_steps = 100  # steps per compiled program and per logged average
    # The same in epochs (may be fractional); when set it wins over log_every_steps.
    training.log_every_epochs = ml_collections.config_dict.placeholder(float)
    training.checkpoint_every_steps = 1000  # Orbax checkpoint interval (and one at the end)
    # The same in epochs; when set it wins over checkpoint_every_steps.
    training.checkpoint_every_epochs = ml_collections.config_dict.placeholder(float)
    training.keep_checkpoints = 3  # newest checkpoints kept in workdir/checkpoints
    training.limit_train_batches = 0  # at most this many steps per epoch; 0: all
    training.fast_dev_run = 0  # n > 0: n steps and n evaluation batches, no checkpoints
    training.early_stopping_patience = 0  # epochs without improvement before stopping; 0: off
    training.early_stopping_monitor = "val/loss"  # an epoch metric: val/..., train/...
    training.early_stopping_mode = "min"  # 'min': lower is better; 'max': higher is better
    # Stop as soon as the monitored metric reaches this value (e.g. train/accuracy 0.9999,
    # mode 'max'); None: no threshold.
    training.stopping_threshold = ml_collections.config_dict.placeholder(float)
    # s in [0, 1): patience and threshold read the running average m ← s·m + (1 − s)·metric
    # over epochs instead of the metric; 0: the metric itself.
    training.stopping_smoothing = 0.0
    training.num_devices = 0  # devices of the data-parallel mesh; 0: all local devices
    # Train seeds seed, seed+1, ... at once, vmapped in one program (in-memory data only);
    # metrics are logged per seed (seed_i/...) and as their mean.
    training.num_seeds = 1
    training.multi_host = False  # call jax.distributed.initialize() first (multi-host runs)

    # How each step makes its updates (bioflax.procedures): 'gradient' (every rule's), or
    # 'weight_mirror' (with rule 'fa': B learned by the mirror update), 'pepita' or
    # 'forward_forward'; the sub-dict of the chosen one holds its options (the fields of its
    # class in bioflax.procedures, with their defaults).
    config.procedure = procedure = ml_collections.ConfigDict()
    procedure.name = "gradient"
    for name, procedure_class in procedures.PROCEDURES.items():
        if dataclasses.is_dataclass(procedure_class):
            procedure[name] = {field.name: field.default
                               for field in dataclasses.fields(procedure_class)}

    config.alignment = alignment = ml_collections.ConfigDict()
    alignment.enabled = True  # gradient/weight alignment with backprop, inside the train step
    # Measured on the steps whose index within the epoch is a multiple of every_steps,
    # with one extra backprop pass on those steps only.
    alignment.every_steps = 100
    # The same in epochs; when set it wins over every_steps.
    alignment.every_epochs = ml_collections.config_dict.placeholder(float)

    # XLA options for every compiled program (``jax.jit``'s compiler_options: names and
    # values of XLA's DebugOptions), e.g. bioflax.conv.CPU_COMPILER_OPTIONS (the LeNet
    # configs'); empty: XLA's defaults.
    config.compiler_options = ml_collections.ConfigDict()
    config.plots = True  # PNG figures and TensorBoard images at the end of the run
    return config
