// Many short-lived buffers per transaction; mimalloc serves them cheaper than glibc's
// malloc (measured with the benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(mxgate::cmd::main());
}
