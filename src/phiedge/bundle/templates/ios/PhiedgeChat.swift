// PhiedgeChat.swift: chat with a phiedge Phi bundle on iOS through the ONNX Runtime GenAI
// Objective-C API (OGAModel, OGATokenizer, OGAGenerator...; onnxruntime-genai 0.14.x), called from Swift.
//
// Dependency (CocoaPods). The pod names come from microsoft/onnxruntime-genai tools/ci_build/github/apple:
//     use_frameworks!
//     pod 'onnxruntime-genai-objc', '~> 0.14.0'   # pulls in onnxruntime-genai-c and onnxruntime-objc
// If the pod is not on the CocoaPods trunk, build it with that folder's build_and_assemble_apple_pods.py and
// reference the output: pod 'onnxruntime-genai-objc', :path => '<staging>/onnxruntime-genai-objc' (and the
// same for onnxruntime-genai-c). No official Swift package for ONNX Runtime GenAI is known. Without
// use_frameworks!, use a bridging header with: #import <Foundation/Foundation.h> then #import "ort_genai_objc.h".
// Model: add the bundle's "phi" folder to the app target as a folder reference (blue folder icon), so it
// is copied as one folder; check that the built .app contains phi/genai_config.json.
// ONNX Runtime GenAI's iOS support is still maturing upstream. Use an iPhone with an A16 chip or newer
// (6 GB RAM), test on a device, not the simulator, and watch memory: iOS ends apps that use too much.
// Loading and generating block: call both off the main thread. onToken runs on that thread.
import Foundation
#if canImport(onnxruntime_genai_objc)
import onnxruntime_genai_objc
#endif

public final class PhiedgeChat {
    public enum Failure: Error { case modelFolderMissing(String) }

    private let model: OGAModel
    private let tokenizer: OGATokenizer

    /// Loads the model folder bundled as a folder reference (takes seconds).
    public init(folder: String = "phi", bundle: Bundle = .main) throws {
        guard let path = bundle.path(forResource: folder, ofType: nil) else {
            throw Failure.modelFolderMissing(folder)
        }
        model = try OGAModel(path: path)
        tokenizer = try OGATokenizer(model: model)
    }

    /// Streams the reply to a prompt that is already in the model's chat format. The Objective-C API has
    /// no applyChatTemplate (the Java, C#, C++ and Python APIs do), so frame the prompt yourself, e.g. with
    /// phi4MiniPrompt or phi3Prompt below. maxLength counts prompt plus reply tokens (genai "max_length").
    public func chat(prompt: String, maxLength: Int = 512, onToken: (String) -> Void) throws {
        let sequences = try tokenizer.encode(prompt)
        let params = try OGAGeneratorParams(model: model)
        try params.setSearchOption("max_length", doubleValue: Double(maxLength))
        let generator = try OGAGenerator(model: model, params: params)
        try generator.appendTokenSequences(sequences)
        let stream = try OGATokenizerStream(tokenizer: tokenizer)
        while try !generator.isDone() {
            try generator.generateNextToken()
            // The Objective-C API has no "last token" call: read the end of sequence 0.
            var error: NSError?
            let count = generator.sequenceCount(at: 0, error: &error)
            if let error { throw error }
            let tokens = try generator.sequenceData(at: 0)
            onToken(try stream.decode(tokens[count - 1]))
        }
    }

    /// One user turn in the Phi-4-mini chat format (tokenizer_config.json of microsoft/Phi-4-mini-instruct).
    public static func phi4MiniPrompt(_ user: String) -> String {
        "<|user|>\(user)<|end|><|assistant|>"
    }

    /// One user turn in the Phi-3 / Phi-3.5 chat format (microsoft/Phi-3.5-mini-instruct).
    public static func phi3Prompt(_ user: String) -> String {
        "<|user|>\n\(user)<|end|>\n<|assistant|>\n"
    }
}
